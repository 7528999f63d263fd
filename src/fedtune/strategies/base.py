"""The strategy protocol, in the spirit of Flower's Strategy: a strategy sees the current
global state and the clients' states with their weights and returns the next global state.
What a strategy remembers between rounds (optimizer moments, control variates) is its
``state_dict``: the round loop checkpoints it with the framework and restores it on resume."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..errors import FedtuneError

State = dict[str, torch.Tensor]


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """Sum_i w_i x_i / Sum_i w_i, accumulated in float64 so the result is exact to the
    output dtype's rounding whatever the number or order of clients."""
    if not states:
        raise FedtuneError("nothing to aggregate: no client returned an update")
    total = float(sum(weights))
    if total <= 0:
        raise FedtuneError("aggregation weights must sum to a positive number")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise FedtuneError("clients returned tunable states with different tensor names")
    out = {}
    for k in keys:
        acc = torch.zeros(states[0][k].shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[k].to(torch.float64) * w
        out[k] = (acc / total).to(states[0][k].dtype)
    return out


class Strategy(ABC):
    name: str

    def __init__(self, cfg=None):
        self.cfg = cfg

    @abstractmethod
    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
