"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the clients' parameters."""

from __future__ import annotations

from .base import State, Strategy, weighted_mean


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        return weighted_mean([s for s, _ in updates], [w for _, w in updates])
