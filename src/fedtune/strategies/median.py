"""Coordinate-wise median (Yin et al., 2018): each parameter is the median of the clients'
values, so fewer than half the clients cannot move it outside the honest range. Unweighted:
a sample count is the client's own claim, and an attacker could inflate it."""

from __future__ import annotations

import torch

from .base import State, Strategy, weighted_mean


def coordinatewise(updates: list[tuple[State, float]], reduce) -> State:
    """``reduce`` over each tensor's client values sorted along dim 0 (float64)."""
    states = [s for s, _ in updates]
    weighted_mean(states, [1.0] * len(states))  # the same checks: something to aggregate, same names
    return {k: reduce(torch.stack([s[k].to(torch.float64) for s in states]).sort(dim=0).values).to(states[0][k].dtype)
            for k in states[0]}


class Median(Strategy):
    name = "median"

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        # With an even count the median is the mean of the two middle values.
        return coordinatewise(updates, lambda s: (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2)
