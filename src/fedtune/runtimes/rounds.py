"""The round loop, written once for every runtime (in the spirit of Flower's ``Strategy.start``
over a ``Grid``). Each round: sample clients, configure each one's message, deliver it and
collect the replies (the runtime's ``Grid``), log the client records, aggregate, evaluate, log
the server record and checkpoint. A runtime supplies only how a message reaches a client and
comes back; the loop never knows which framework it runs, and the runtime never does either.

What methods keep between rounds checkpoints here and nowhere else: the framework's
``state_dict`` (global state, strategy moments, server optimizer) and each client's state
(``ClientResult.state``: kd's local model, control variates), held by ``ClientStates``: the
round's clients' states in memory and in the checkpoint, every other client's in its own file
under RUN/client_states/. Flower's nodes keep their client's state between rounds and get it
from the loop only after ``--resume``; the in-process grid keeps none and gets the round's states
every round."""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from .. import models
from ..console import Progress
from ..errors import FedtuneError
from ..frameworks.base import SUMMED, Framework
from ..metering import measure
from ..personalization import client_stats
from ..rundir import ADAPTER, RunDir
from ..training import derive_seed, seeded
from ..wire import Message, deserialize, serialize
from .client_states import ClientStates

Serve = Callable[[int, int, bytes], bytes]  # (round, client, request blob) -> reply blob


@dataclass
class Reply:
    blob: bytes | None  # the client's upload, serialized; None: it went into a secure sum (Grid.summed)
    state: Any  # what the client keeps for its next round (None: nothing)
    record: dict[str, Any]  # the client's metrics record


OnReply = Callable[[int, Reply], None]


@dataclass
class Sum:
    """A round's uploads as the server gets them under secure aggregation: their weighted mean
    alone, never one client's upload."""

    blob: bytes  # the mean, serialized as one upload
    weight: float  # the clients' total weight (num_samples)
    record: dict[str, Any]  # for the server record: what the protocol cost


class Grid(ABC):
    """How a runtime moves one round's messages."""

    keeps_states = True  # its nodes keep their client's state between rounds (False: the loop hands it in)

    def start(self, serve: Serve | None) -> None:
        """Called once before the first round; ``serve`` answers per-batch messages (split
        learning) and is None for frameworks that exchange one message per round."""

    @abstractmethod
    def fit(self, rnd: int, blobs: dict[int, bytes], restore: dict[int, Any], on_reply: OnReply) -> dict[int, str]:
        """Deliver each client its blob and run its round; hand each reply to ``on_reply`` as it
        is complete (in the order of ``blobs`` where the runtime can); return the clients that
        failed, with the reason. ``restore`` holds the client states the client's node must use
        instead of its own: after ``--resume`` the checkpointed ones; every round, where the grid
        does not keep states (``keeps_states``), each sampled client's."""

    def summed(self) -> Sum | None:
        """After ``fit``: the uploads' weighted mean when the runtime aggregated them securely (the
        replies then carry no blob); None when each upload came back on its own."""
        return None

    def stop(self) -> None: ...


def sample_clients(cfg, rnd: int) -> list[int]:
    """The round's clients: a seeded subset of round(fraction x clients); under
    privacy.central_dp each client joins independently with probability fed.fraction (the
    Poisson participation DP-FedAvg's accountant counts; the round may have no client)."""
    if cfg.privacy.central_dp:
        rng = random.Random(derive_seed(cfg.seed, "participate", rnd))
        return [cid for cid in range(cfg.fed.clients) if rng.random() < cfg.fed.fraction]
    k = max(1, round(cfg.fed.fraction * cfg.fed.clients))
    if k >= cfg.fed.clients:
        return list(range(cfg.fed.clients))
    return sorted(random.Random(derive_seed(cfg.seed, "sample", rnd)).sample(range(cfg.fed.clients), k))


def run_rounds(fw: Framework, grid: Grid, rundir: RunDir, progress: Progress | None = None,
               resume: bool = False) -> dict[str, Any]:
    cfg, progress = fw.cfg, progress or Progress()
    wall = time.perf_counter()
    first, states = restore(fw, rundir) if resume else (1, ClientStates.of_run(rundir.path, None))
    states.prune()
    pending = set(states) if grid.keeps_states else set()  # checkpointed states not yet handed back to their nodes
    grid.start(serve_fn(fw) if fw.per_batch else None)
    progress.start(cfg.fed.rounds, first)
    try:
        for rnd in range(first, cfg.fed.rounds + 1):
            started = time.perf_counter()
            sampled = sample_clients(cfg, rnd)
            if not sampled:  # Poisson participation drew no client: nothing to train or aggregate
                progress.round_done(rnd, skip_round(fw, rundir, rnd, states))
                continue
            blobs = {cid: serialize(fw.configure(rnd, cid)) for cid in sampled}
            uploads: dict[int, tuple[bytes, dict]] = {}

            def on_reply(cid: int, reply: Reply, rnd=rnd, uploads=uploads) -> None:
                if reply.state is not None:
                    states[cid] = reply.state
                rundir.metrics.append(reply.record)
                progress.client_done(rnd, cid, reply.record)
                uploads[cid] = (reply.blob, reply.record)

            errors = grid.fit(rnd, blobs, handed(grid, states, pending, sampled), on_reply)
            summed = grid.summed()
            # Aggregation sums in sampled order on every runtime, whatever order replies came in.
            uploads = {cid: uploads[cid] for cid in sampled if cid in uploads}
            dropped = [cid for cid in sampled if cid not in uploads]
            if not uploads:
                raise FedtuneError(f"round {rnd}: no client answered (dropped {dropped}; errors {errors})")
            extra = {"dropped": dropped, "client_errors": {str(c): e for c, e in errors.items()}} if dropped else {}
            server = close_round(fw, rundir, rnd, uploads, started, states, extra, summed)
            progress.round_done(rnd, server)
    finally:
        progress.stop()
        grid.stop()
    return finish(fw, rundir, time.perf_counter() - wall, states)


def handed(grid: Grid, states: ClientStates, pending: set[int], sampled: list[int]) -> dict[int, Any]:
    """The states the loop hands the round's nodes: every sampled client's where the grid keeps
    none itself, else the checkpointed ones its nodes have not had back since ``--resume``."""
    if grid.keeps_states:
        cids = [cid for cid in sampled if cid in pending]
        pending.difference_update(cids)
    else:
        cids = [cid for cid in sampled if cid in states]
    return {cid: states[cid] for cid in cids}


def serve_fn(fw: Framework) -> Serve:
    return lambda rnd, cid, blob: serialize(fw.serve(rnd, cid, deserialize(blob)))


class MeteredLink:
    """A client's per-batch channel to the server that counts the serialized bytes each way
    and the time the server spent answering (which is not the client's compute)."""

    def __init__(self, transport: Callable[[bytes], bytes]):
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


def run_client(fw: Framework, rnd: int, cid: int, down: bytes, state, link: MeteredLink | None) -> Reply:
    """The client's whole round: decode what the server sent, fit (metered), encode the reply."""
    cfg = fw.cfg
    with seeded(cfg.seed, "fit", rnd, cid), measure(fw.ctx.device) as usage:
        result = fw.client_fit(rnd, cid, deserialize(down), state, link)
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
    return Reply(up, result.state, record)


def close_round(fw: Framework, rundir: RunDir, rnd: int, uploads: dict[int, tuple[bytes | None, dict]],
                started: float, client_states: ClientStates, extra: dict[str, Any] | None = None,
                summed: Sum | None = None) -> dict[str, Any]:
    """Aggregate, evaluate, log the server record and checkpoint. A secure sum reaches the
    framework as one upload of the total weight (its weighted mean is the mean itself)."""
    if summed is None:
        results = {cid: (deserialize(blob), rec) for cid, (blob, rec) in uploads.items()}
    else:
        results = {SUMMED: (deserialize(summed.blob), {"num_samples": summed.weight})}
    with measure(fw.ctx.device) as usage:
        agg = fw.aggregate(rnd, results) or {}
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
        **client_stats([rec for _, rec in uploads.values()]),  # data.client_test_size: clients' own scores
        **(summed.record if summed else {}),
        **(extra or {}),
    }
    rundir.metrics.append(record)
    save_checkpoint(fw, rundir, rnd, client_states, keep=uploads)
    return record


def skip_round(fw: Framework, rundir: RunDir, rnd: int, client_states: ClientStates) -> dict[str, Any]:
    """Log and checkpoint a round no client joined (the model as it was); central DP still counts it."""
    record = {"round": rnd, "framework": fw.cfg.framework, "client": "server", **fw.evaluate(rnd), "clients": [],
              "skipped": "no client joined", **(fw.central_dp.skip() if fw.central_dp else {})}
    rundir.metrics.append(record)
    save_checkpoint(fw, rundir, rnd, client_states, keep=())
    return record


def save_checkpoint(fw: Framework, rundir: RunDir, rnd: int, client_states: ClientStates, keep) -> None:
    """The round's checkpoint, once the states of the clients not in ``keep`` are on disk: their
    files are part of it (ClientStates says why this order keeps resume exact)."""
    client_states.spill(keep)
    rundir.save_checkpoint(rnd, {"framework": fw.state_dict(), "clients": client_states.checkpoint()})
    client_states.drop_stale()


def restore(fw: Framework, rundir: RunDir) -> tuple[int, ClientStates]:
    """-> (first round to run, client states) from the run directory's checkpoint."""
    ckpt = rundir.load_checkpoint()
    if ckpt is None:
        rundir.metrics.truncate_after(0)
        return 1, ClientStates.of_run(rundir.path, None)
    states = ClientStates.of_run(rundir.path, ckpt)
    fw.load_state_dict(ckpt["framework"])
    rundir.metrics.truncate_after(ckpt["round"])
    return ckpt["round"] + 1, states


def finish(fw: Framework, rundir: RunDir, wall_seconds: float,
           client_states: ClientStates | None = None) -> dict[str, Any]:
    """adapter/ (the global model), adapters/client-K/ (each client's personal model, under
    fed.personalization), summary.json and the adapter README."""
    fw.personal.save_clients(fw, rundir.path, client_states or {})
    models.save_adapter(fw.global_model(), rundir.path / ADAPTER, fw.ctx.data.label_names, fw.ctx.tokenizer,
                        fw.cfg.model.name)
    server = [r for r in rundir.metrics.records() if r["client"] == "server"]
    own = {k: v for k, v in server[-1].items() if k.startswith("client_test_")} if server else {}
    summary = rundir.write_summary(
        {"framework": fw.cfg.framework, "runtime": fw.cfg.runtime, "model": fw.cfg.model.name,
         "seed": fw.cfg.seed, "wall_seconds": wall_seconds, **own}
    )
    rundir.write_adapter_readme(fw.cfg, summary)
    if fw.cfg.privacy.audit:  # canaries were planted: the audit's lower bound beside the accountant's epsilon
        from ..privacy import audit

        ctx = fw.ctx
        audit.write(rundir.path, audit.measure(fw.cfg, fw.global_model(), ctx.task, ctx.tokenizer, ctx.device,
                                               ctx.data, rundir.metrics.records()))
    return summary
