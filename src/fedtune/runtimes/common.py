"""What every runtime does the same way: sampling clients, running and metering one client's
round from the bytes it received to the bytes it sends, and closing a round on the server."""

from __future__ import annotations

import random
import time
from typing import Any

from .. import models
from ..frameworks import Framework
from ..metering import Message, deserialize, measure, serialize
from ..rundir import ADAPTER, RunDir
from ..training import derive_seed, seeded


def sample_clients(cfg, rnd: int) -> list[int]:
    k = max(1, round(cfg.fed.fraction * cfg.fed.clients))
    if k >= cfg.fed.clients:
        return list(range(cfg.fed.clients))
    return sorted(random.Random(derive_seed(cfg.seed, "sample", rnd)).sample(range(cfg.fed.clients), k))


class MeteredLink:
    """A client's per-batch channel to the server that counts the serialized bytes each way
    and the time the server spent answering (which is not the client's compute)."""

    def __init__(self, transport):
        self.transport = transport  # bytes -> bytes, delivered to the server and answered
        self.bytes_up = self.bytes_down = 0
        self.remote_seconds = 0.0

    def exchange(self, msg: Message) -> Message:
        blob = serialize(msg)
        self.bytes_up += len(blob)
        start = time.perf_counter()
        reply = self.transport(blob)
        self.remote_seconds += time.perf_counter() - start
        self.bytes_down += len(reply)
        return deserialize(reply)


def run_client(fw: Framework, rnd: int, cid: int, down: bytes, state, link: MeteredLink | None):
    """The client's whole round: decode what the server sent, fit (metered), encode the reply.
    -> (reply bytes, new client state, metrics record)."""
    cfg = fw.cfg
    with seeded(cfg.seed, "fit", rnd, cid), measure(fw.ctx.device) as usage:
        result = fw.fit(rnd, cid, deserialize(down), state, link)
    up = serialize(result.message)
    remote = link.remote_seconds if link else 0.0
    record = {
        "round": rnd,
        "framework": cfg.framework,
        "client": cid,
        "bytes_up": len(up) + (link.bytes_up if link else 0),
        "bytes_down": len(down) + (link.bytes_down if link else 0),
        "client_seconds": usage.seconds - remote,
        "client_peak_mem_bytes": usage.peak_mem_bytes,
        **result.metrics,
    }
    if link and (link.bytes_up or link.bytes_down):
        record.update(bytes_up_link=link.bytes_up, bytes_down_link=link.bytes_down)
    return up, result.state, record


def close_round(fw: Framework, rundir: RunDir, rnd: int, uploads: dict[int, tuple[bytes, dict]], started: float,
                client_states: dict, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate, evaluate, log the server record and checkpoint."""
    with measure(fw.ctx.device) as usage:
        agg = fw.aggregate(rnd, {cid: (deserialize(blob), rec) for cid, (blob, rec) in uploads.items()}) or {}
    ev = fw.evaluate(rnd)
    record = {
        "round": rnd,
        "framework": fw.cfg.framework,
        "client": "server",
        **ev,
        "server_seconds": usage.seconds,
        "round_seconds": time.perf_counter() - started,
        "clients": sorted(uploads),
        **agg,
        **(extra or {}),
    }
    rundir.metrics.append(record)
    rundir.save_checkpoint(rnd, {"framework": fw.state_dict(), "client_states": client_states})
    return record


def restore(fw: Framework, rundir: RunDir) -> tuple[int, dict]:
    """-> (first round to run, client states) from the run directory's checkpoint."""
    ckpt = rundir.load_checkpoint()
    if ckpt is None:
        rundir.metrics.truncate_after(0)
        return 1, {}
    fw.load_state_dict(ckpt["framework"])
    rundir.metrics.truncate_after(ckpt["round"])
    return ckpt["round"] + 1, ckpt["client_states"]


def finish(fw: Framework, rundir: RunDir, wall_seconds: float) -> dict[str, Any]:
    models.save_adapter(fw.global_model(), rundir.path / ADAPTER, fw.ctx.data.label_names)
    return rundir.write_summary(
        {"framework": fw.cfg.framework, "runtime": fw.cfg.runtime, "model": fw.cfg.model.name,
         "seed": fw.cfg.seed, "wall_seconds": wall_seconds}
    )
