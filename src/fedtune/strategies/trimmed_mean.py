"""Coordinate-wise trimmed mean (Yin et al., 2018): per parameter, drop the
``floor(fed.trim_fraction * n)`` largest and smallest client values and average the rest."""

from __future__ import annotations

import math

from .base import State, Strategy
from .median import coordinatewise


class TrimmedMean(Strategy):
    name = "trimmed_mean"

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        k = math.floor(self.cfg.fed.trim_fraction * len(updates))
        return coordinatewise(updates, lambda s: s[k: len(s) - k].mean(dim=0))
