"""Norm bounding (Sun et al., 2019): each client's update (its state minus the current global
state) is scaled down to L2 norm at most ``fed.norm_bound``, then averaged by samples, so no
single client moves the global state by more than its share of the bound."""

from __future__ import annotations

import torch

from .base import State, Strategy, weighted_mean


def clip_update(state: State, current: State, bound: float) -> State:
    """``current + delta * min(1, bound / ||delta||)`` with delta = state - current (float64)."""
    delta = {k: state[k].to(torch.float64) - current[k].to(torch.float64) for k in state}
    norm = torch.sqrt(sum(d.pow(2).sum() for d in delta.values()))
    factor = min(1.0, bound / max(float(norm), 1e-12))
    return {k: (current[k].to(torch.float64) + delta[k] * factor).to(state[k].dtype) for k in state}


class NormBound(Strategy):
    name = "norm_bound"

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        bound = self.cfg.fed.norm_bound
        return weighted_mean([clip_update(s, current, bound) for s, _ in updates], [w for _, w in updates])
