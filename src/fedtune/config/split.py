"""The split section: split learning's cut and what crosses it (docs/split.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FedtuneError
from .checks import one_of


@dataclass
class SplitConfig:
    # Transformer blocks (plus embeddings) kept on the client; 0 = auto (split_layer_for): 2, or
    # L-1 for models with fewer than 3 blocks (the tiny test models have 2).
    split_layer: int = 0
    samples_per_round: int = 0  # 0 = the client's whole shard each round
    act_dtype: str = "fp32"  # fp32, fp16, bf16, int8
    act_topk: float = 0.0  # 0 = dense; else the fraction of activation values kept
    # Research directions (docs/split.md, "Research directions").
    client_layers: list[int] = field(default_factory=list)  # one cut per client; empty = split_layer for all
    auto: bool = False  # pick each client's cut with the cost model (frameworks/split/plan.py) from client_profiles
    # One [flops_per_s, memory_mb, bandwidth_mbps] per client, read by auto.
    client_profiles: list[list[float]] = field(default_factory=list)
    server_flops_per_s: float = 1e13  # the server's speed in the cost model (per client it serves)
    act_budget_mb: float = 0.0  # > 0: each client's activation uploads per round fit this (frameworks/split/codecs.py)
    sample: str = "random"  # which rows samples_per_round takes: "random" (seeded) or "loss" (highest first)


def split_layer_for(split_layer: int, depth: int) -> int:
    """The blocks a split-learning client keeps for a model of ``depth`` blocks: ``split_layer``,
    or with 0 (auto) 2, or depth-1 for shallower models so that the server keeps at least one."""
    return split_layer or min(2, depth - 1)


def validate(cfg: Any) -> None:
    s = cfg.split
    one_of("split.act_dtype", s.act_dtype, ("fp32", "fp16", "bf16", "int8"))
    if not 0.0 <= s.act_topk < 1.0:
        raise FedtuneError(f"split.act_topk must be in [0, 1) (0 = dense); got {s.act_topk}")
    if s.split_layer < 0:
        raise FedtuneError(f"split.split_layer must be >= 0 (0 = auto); got {s.split_layer}")
    if s.samples_per_round < 0:
        raise FedtuneError("split.samples_per_round must be >= 0 (0 = the whole shard)")
    _validate_directions(s, cfg.fed.clients)


def _validate_directions(s: SplitConfig, clients: int) -> None:
    """split.client_layers, auto, client_profiles, server_flops_per_s, act_budget_mb, sample (docs/split.md)."""
    one_of("split.sample", s.sample, ("random", "loss"))
    if s.client_layers and len(s.client_layers) != clients:
        raise FedtuneError(f"split.client_layers needs one cut per client (fed.clients={clients}); "
                           f"got {len(s.client_layers)}: {s.client_layers}")
    if any(c < 1 for c in s.client_layers):
        raise FedtuneError(f"split.client_layers must be cuts >= 1 (blocks kept by each client); got {s.client_layers}")
    if s.auto and s.client_layers:
        raise FedtuneError("set split.client_layers or split.auto=true, not both")
    if s.client_profiles and not s.auto:
        raise FedtuneError("split.client_profiles is read by split.auto=true only; set split.auto=true or drop it")
    if s.auto and len(s.client_profiles) != clients:
        raise FedtuneError(f"split.auto=true needs split.client_profiles: one [flops_per_s, memory_mb, "
                           f"bandwidth_mbps] per client (fed.clients={clients}); got {len(s.client_profiles)}")
    for cid, p in enumerate(s.client_profiles):
        if len(p) != 3 or not all(0 < v < float("inf") for v in p):
            raise FedtuneError(f"split.client_profiles[{cid}] must be [flops_per_s, memory_mb, bandwidth_mbps], "
                               f"three finite numbers > 0; got {p}")
    if not 0 < s.server_flops_per_s < float("inf"):
        raise FedtuneError(f"split.server_flops_per_s must be a finite number > 0; got {s.server_flops_per_s}")
    if not 0 <= s.act_budget_mb < float("inf"):
        raise FedtuneError(f"split.act_budget_mb must be >= 0 (0 = off); got {s.act_budget_mb}")
    if s.act_budget_mb and (s.act_dtype != "fp32" or s.act_topk):
        raise FedtuneError("split.act_budget_mb chooses the precision and top-k per batch: leave split.act_dtype=fp32 "
                           f"and split.act_topk=0; got act_dtype={s.act_dtype}, act_topk={s.act_topk}")


def mixed_cuts(s: SplitConfig) -> bool:
    """Whether clients may cut at different blocks (then they hold different tensors)."""
    return s.auto or len(set(s.client_layers)) > 1
