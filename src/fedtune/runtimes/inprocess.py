"""The in-process runtime: every simulated client and the server share one process and one
frozen base model; clients swap in their small tunable state, so memory does not grow with
the number of clients. Messages are still serialized and decoded, so the bytes counted are
the bytes a network would carry."""

from __future__ import annotations

from ..console import Progress
from ..frameworks import get
from ..frameworks.base import Context, Framework
from ..rundir import RunDir
from .rounds import Grid, MeteredLink, Serve, run_client, run_rounds


class InProcessGrid(Grid):
    """Runs each sampled client in turn, in this process. It keeps no client state: the round
    loop's store (memory for the round's clients, disk for the others) hands in each sampled
    client's state every round, so no second copy of every client's state lives here."""

    keeps_states = False

    def __init__(self, fw: Framework, progress: Progress):
        self.fw, self.progress = fw, progress
        self.serve: Serve | None = None

    def start(self, serve):
        self.serve = serve

    def fit(self, rnd, blobs, restore, on_reply):
        for pos, (cid, blob) in enumerate(blobs.items(), 1):
            self.progress.client(rnd, cid, pos, len(blobs))
            link = MeteredLink(lambda b, c=cid: self.serve(rnd, c, b)) if self.serve else None
            on_reply(cid, run_client(self.fw, rnd, cid, blob, restore.pop(cid, None), link))
        return {}


def run(cfg, rundir: RunDir, progress: Progress | None = None, resume: bool = False):
    progress = progress or Progress()
    ctx = Context.build(cfg)
    ctx.on_step = progress.step
    fw = get(cfg.framework)(ctx)
    return run_rounds(fw, InProcessGrid(fw, progress), rundir, progress, resume)
