"""Krum and Multi-Krum (Blanchard et al., 2017). With up to ``f = fed.krum_f`` Byzantine clients
among n, each update is scored by the summed squared distance to its n - f - 2 nearest others;
Krum keeps the best-scored update, Multi-Krum averages the n - f best (sample-weighted)."""

from __future__ import annotations

import torch

from ..errors import FedtuneError
from .base import State, Strategy, weighted_mean


def krum_scores(states: list[State], f: int) -> torch.Tensor:
    n = len(states)
    if n < 2 * f + 3:
        raise FedtuneError(f"krum with fed.krum_f={f} needs >= {2 * f + 3} updates; got {n}")
    flat = torch.stack([torch.cat([s[k].to(torch.float64).flatten() for k in sorted(s)]) for s in states])
    d2 = torch.cdist(flat, flat).pow(2)
    d2.fill_diagonal_(float("inf"))  # a client is not its own neighbour
    return d2.sort(dim=1).values[:, : n - f - 2].sum(dim=1)


class Krum(Strategy):
    name = "krum"

    def select(self, updates: list[tuple[State, float]]) -> list[int]:
        scores = krum_scores([s for s, _ in updates], self.cfg.fed.krum_f)
        return scores.argsort(stable=True)[: self.keep(len(updates))].tolist()

    def keep(self, n: int) -> int:
        return 1

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        chosen = [updates[i] for i in self.select(updates)]
        return weighted_mean([s for s, _ in chosen], [w for _, w in chosen])


class MultiKrum(Krum):
    name = "multikrum"

    def keep(self, n: int) -> int:
        return n - self.cfg.fed.krum_f
