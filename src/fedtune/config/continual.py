"""The continual section: labels that arrive in groups over rounds (docs/continual.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FedtuneError
from .checks import one_of


@dataclass
class ContinualConfig:
    """Continual learning (docs/continual.md): the labels arrive in ``tasks`` groups over rounds."""

    tasks: int = 1  # T label groups, one after another; 1 = off
    rounds_per_task: int = 1  # rounds of each task; the last task also runs any rounds after T * this
    method: str = "none"  # "none", "ewc" (elastic weight consolidation) or "replay" (rows of past tasks)
    ewc_lambda: float = 100.0  # ewc: the penalty's weight, lambda/2 * sum F (w - w*)^2 per past task
    replay_per_task: int = 20  # replay: rows of each past task a client keeps and trains on again


def validate(cfg: Any) -> None:
    """continual.*; which frameworks and tasks run it is a rule across families (rules.py)."""
    c = cfg.continual
    one_of("continual.method", c.method, ("none", "ewc", "replay"))
    if c.tasks < 1 or c.rounds_per_task < 1:
        raise FedtuneError(f"continual.tasks and continual.rounds_per_task must be >= 1; got {c.tasks}, "
                           f"{c.rounds_per_task}")
    if not 0.0 <= c.ewc_lambda < float("inf"):
        raise FedtuneError(f"continual.ewc_lambda must be a finite number >= 0; got {c.ewc_lambda}")
    if c.replay_per_task < 0 or (c.method == "replay" and c.replay_per_task < 1):
        raise FedtuneError(f"continual.replay_per_task must be >= 1 with continual.method=replay (>= 0 otherwise); "
                           f"got {c.replay_per_task}")
    if c.tasks == 1:
        if c.method != "none":
            raise FedtuneError(f"continual.method={c.method} needs continual.tasks > 1 (1 = continual learning off)")
        return
    if 0 < cfg.data.max_labels < c.tasks:
        raise FedtuneError(f"continual.tasks={c.tasks} needs at least as many labels; data.max_labels="
                           f"{cfg.data.max_labels}")
    if cfg.fed.rounds < c.tasks * c.rounds_per_task:
        raise FedtuneError(f"fed.rounds={cfg.fed.rounds} leaves tasks unseen: continual.tasks * "
                           f"continual.rounds_per_task = {c.tasks * c.rounds_per_task}")
    if c.method != "none" and cfg.fed.fraction < 1.0:
        # Each client keeps its Fisher or replay rows when a task ends: it must take part in that round.
        raise FedtuneError(f"continual.method={c.method} needs fed.fraction=1 (every client closes each task); "
                           f"got {cfg.fed.fraction}")
    if c.method == "ewc" and (cfg.privacy.dp_sgd or cfg.privacy.output_noise_multiplier):
        raise FedtuneError("continual.method=ewc does not combine with privacy.dp_sgd or privacy.output_noise_multiplier "
                           "(its Fisher pass uses un-noised gradients and activations)")
