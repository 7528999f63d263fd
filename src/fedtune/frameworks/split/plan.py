"""Resource-aware cuts for split learning (``split.auto = true``): a cost model picks each
client's cut from its profile (``split.client_profiles``: [flops_per_s, memory_mb,
bandwidth_mbps] per client) to minimise the round's latency, the slowest client's.

For client i cut after c blocks, with the round's workload (``Workload``: n batches of B rows x
T tokens, T the client's mean real tokens per row):

    client_s(c)   = n * FLOPs(blocks 0..c-1, train) / flops_per_s_i
    server_s(c)   = n * FLOPs(blocks c..L-1 and the head, train) / server_flops_per_s
    transfer_s(c) = (n * 2 * B*T*hidden * value_bytes + 2 * adapter_bytes(c)) * 8 / (bandwidth_mbps_i * 1e6)
    latency_i(c)  = client_s(c) + transfer_s(c) + server_s(c)
    memory_i(c)   = 4 * (embedding params + params of blocks 0..c-1)
                    + c * 2*B*T*hidden * (34 + 5 * heads * T / hidden)           [bytes]

FLOPs are the framework's analytic count (``metering.FlopModel.count``), the same the client
records carry. The transfer is the activations up and their gradient down at ``split.act_dtype``
(``value_bytes``: 4, 2 or 1; the same at every cut, since every block's output has the hidden
width) plus the client-side adapter down and up, which grows with c. The memory is the frozen
weights the client holds in fp32 plus the activations its blocks keep for the backward pass
(Korthikanti et al., 2022: 34*s*b*h + 5*a*s^2*b bytes per block in 16-bit, doubled for fp32).
The server is modelled as serving each client at ``server_flops_per_s``.

Each client gets the cut with the least latency among those whose memory fits ``memory_mb``
(ties: the fewer client blocks). Clients do not share a resource in this model, so that choice
minimises the slowest client's latency too. A client that fits no cut is a one-line error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import FedtuneError
from ...metering import FlopModel

VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass(frozen=True)
class Profile:
    flops_per_s: float
    memory_mb: float
    bandwidth_mbps: float


@dataclass(frozen=True)
class Workload:
    """What one client does in a round, and what the model's parts weigh."""

    flops: FlopModel
    batch: int  # rows per batch
    length: int  # tokens per row
    batches: int  # batches per round (all local epochs)
    hidden: int
    heads: int
    value_bytes: int  # bytes per activation value on the wire
    base_params: int  # the embeddings (and anything else below block 0)
    block_params: tuple[int, ...]  # parameters of each block
    adapter_bytes: tuple[int, ...]  # [c]: serialized bytes of the client-side tunable state at cut c (index 0 unused)


@dataclass(frozen=True)
class CutCost:
    cut: int
    client_s: float
    transfer_s: float
    server_s: float
    memory_mb: float

    @property
    def latency_s(self) -> float:
        return self.client_s + self.transfer_s + self.server_s


def costs(w: Workload, p: Profile, server_flops_per_s: float) -> list[CutCost]:
    """The modelled cost of every cut 1..L-1 for a client of profile ``p``."""
    depth = len(w.block_params)
    tokens = w.batch * w.length
    act_bytes = 2 * tokens * w.hidden * w.value_bytes  # activations up, gradient down
    kept = 2 * tokens * w.hidden * (34 + 5 * w.heads * w.length / w.hidden)  # per block, fp32
    out = []
    for c in range(1, depth):
        client = w.flops.count(w.batch, w.length, True, blocks=range(0, c), head=False)
        server = w.flops.count(w.batch, w.length, True, blocks=range(c, depth), head=True)
        sent = w.batches * act_bytes + 2 * w.adapter_bytes[c]
        memory = 4 * (w.base_params + sum(w.block_params[:c])) + c * kept
        out.append(CutCost(c, w.batches * client / p.flops_per_s, sent * 8 / (p.bandwidth_mbps * 1e6),
                           w.batches * server / server_flops_per_s, memory / 2**20))
    return out


def choose(options: list[CutCost], p: Profile, cid: int) -> CutCost:
    fits = [o for o in options if o.memory_mb <= p.memory_mb]
    if not fits:
        least = min(options, key=lambda o: o.memory_mb)
        raise FedtuneError(f"split.client_profiles[{cid}]: memory_mb={p.memory_mb:g} fits no cut "
                           f"(cut {least.cut} needs {least.memory_mb:.1f} MB)")
    return min(fits, key=lambda o: (o.latency_s, o.cut))


def plan(workloads: list[Workload], profiles: list[list[float]], server_flops_per_s: float) -> list[CutCost]:
    """Each client's chosen cut and its modelled cost."""
    return [choose(costs(w, Profile(*p), server_flops_per_s), Profile(*p), cid)
            for cid, (w, p) in enumerate(zip(workloads, profiles))]


def record(chosen: list[CutCost]) -> dict:
    """The server record's account of the plan."""
    return {"client_layers": [c.cut for c in chosen],
            "modelled_latency_s": [round(c.latency_s, 6) for c in chosen],
            "modelled_round_latency_s": round(max(c.latency_s for c in chosen), 6)}


def describe(chosen: list[CutCost]) -> str:
    """One line for the run log."""
    parts = [f"client {i}: cut {c.cut} ({c.latency_s:.3g} s = {c.client_s:.3g} client + {c.transfer_s:.3g} "
             f"transfer + {c.server_s:.3g} server, {c.memory_mb:.0f} MB)" for i, c in enumerate(chosen)]
    return f"split.auto: round latency {max(c.latency_s for c in chosen):.3g} s; " + "; ".join(parts)


def mean_length(rows: list[list[int]], max_length: int) -> int:
    return max(1, round(sum(min(len(r), max_length) for r in rows) / max(len(rows), 1)))


def batches_per_round(rows: int, samples_per_round: int, batch: int, epochs: int) -> int:
    n = min(rows, samples_per_round) if samples_per_round else rows
    return epochs * math.ceil(n / batch)

