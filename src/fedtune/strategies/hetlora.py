"""HetLoRA (Cho et al., 2024): clients train LoRA of their own rank r_i, the leading r_i
components of a global rank-r_max adapter. The server zero-pads every upload to r_max and takes
a sparsity-weighted mean: client i weighs n_i * ||B_i A_i||_F (samples times the Frobenius norm
of its whole update, summed over modules), so clients whose update carries more signal count
more, as the paper's norm-based weighting. Each client then gets the leading r_i components."""

from __future__ import annotations

from ..adapters.lora_state import pairs, products, rank, resize, weighted
from .base import State
from .rank import RankStrategy


class HetLoRA(RankStrategy):
    name = "hetlora"

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        r_max = max(rank(current), *(rank(s) for s, _ in updates))
        padded = [resize(s, r_max) for s, _ in updates]
        norms = [sum(float((p**2).sum()) for p in products(s).values()) ** 0.5 for s in padded]
        weights = [w * n for (_, w), n in zip(updates, norms)]
        if sum(weights) <= 0:  # no client moved its adapter: fall back to samples
            weights = [w for _, w in updates]
        out = self.others_mean(updates)
        for a, b in pairs(padded[0]).values():
            for key in (a, b):
                out[key] = weighted([s[key] for s in padded], weights).to(padded[0][key].dtype)
        return out
