"""The zo section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FedtuneError
from .checks import one_of


@dataclass
class ZOConfig:
    """Zeroth-order tuning with shared seeds (FedKSeed; docs/zo.md)."""

    seeds: int = 4096  # K: candidate seeds shared by server and clients (the history is at most K pairs)
    eps: float = 1e-3  # perturbation scale of the two-point estimate
    lr: float = 1e-3  # step size: w -= lr * g * z
    steps: int = 200  # zeroth-order steps per client per round (one batch each); 0 = one per batch for train.local_epochs
    params: str = "tunable"  # "tunable" (LoRA + head) or "all" (every parameter)


def validate(cfg: Any) -> None:
    zo = cfg.zo
    one_of("zo.params", zo.params, ("tunable", "all"))
    if not 1 <= zo.seeds <= 2**31 - 1:  # seed indices travel as int32
        raise FedtuneError(f"zo.seeds must be in [1, 2**31 - 1]; got {zo.seeds}")
    for key, value in (("zo.eps", zo.eps), ("zo.lr", zo.lr)):
        if not value > 0 or value == float("inf"):
            raise FedtuneError(f"{key} must be a finite number > 0; got {value}")
    if zo.steps < 0:
        raise FedtuneError(f"zo.steps must be >= 0 (0 = one step per batch); got {zo.steps}")
