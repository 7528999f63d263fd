"""The in-process runtime: every simulated client and the server share one process and one
frozen base model; clients swap in their small tunable state, so memory does not grow with
the number of clients. Messages are still serialized and decoded, so the bytes counted are
the bytes a network would carry."""

from __future__ import annotations

import time

from ..frameworks import Context, get
from ..metering import deserialize, serialize
from ..reporting import Progress
from ..rundir import RunDir
from .common import MeteredLink, close_round, finish, restore, run_client, sample_clients


def run(cfg, rundir: RunDir, progress: Progress | None = None, resume: bool = False):
    progress = progress or Progress()
    wall = time.perf_counter()
    ctx = Context.build(cfg)
    ctx.on_step = progress.step
    fw = get(cfg.framework)(ctx)
    first, states = restore(fw, rundir) if resume else (1, {})
    progress.start(cfg.fed.rounds, first)
    try:
        for rnd in range(first, cfg.fed.rounds + 1):
            started = time.perf_counter()
            sampled = sample_clients(cfg, rnd)
            uploads = {}
            for pos, cid in enumerate(sampled, 1):
                progress.client(rnd, cid, pos, len(sampled))
                down = serialize(fw.configure(rnd, cid))
                link = MeteredLink(lambda blob, c=cid, r=rnd: serve(fw, r, c, blob))
                up, state, record = run_client(fw, rnd, cid, down, states.get(cid), link)
                if state is not None:
                    states[cid] = state
                rundir.metrics.append(record)
                uploads[cid] = (up, record)
            server = close_round(fw, rundir, rnd, uploads, started, states)
            progress.round_done(rnd, server)
    finally:
        progress.stop()
    return finish(fw, rundir, time.perf_counter() - wall)


def serve(fw, rnd, cid, blob: bytes) -> bytes:
    return serialize(fw.serve(rnd, cid, deserialize(blob)))
