"""FlexLoRA (Bai et al., 2024): the server forms each client's full update B_i A_i (any rank),
takes their sample-weighted mean W, and factors it by SVD. The global adapter is W's best
rank-r_max approximation, split evenly: B = U sqrt(S), A = sqrt(S) V^T, in singular-value
order. A client of rank r_i gets the leading r_i components, which are W's best rank-r_i
factors (Eckart-Young: the leading singular triplets of the truncation are W's own), with
squared error the sum of the discarded squared singular values."""

from __future__ import annotations

import torch

from .base import State
from .lora import RankStrategy, pairs, products, rank, weighted


def svd_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (B, A) with B A the best rank-r approximation of w (float64)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


class FlexLoRA(RankStrategy):
    name = "flexlora"

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        r_max = max(rank(current), *(rank(s) for s, _ in updates))
        per_client = [products(s) for s, _ in updates]
        weights = [w for _, w in updates]
        out = self.others_mean(updates)
        for module, (a, b) in pairs(current).items():
            mean = weighted([p[module] for p in per_client], weights)
            b_new, a_new = svd_factors(mean, r_max)
            out[a], out[b] = a_new.to(current[a].dtype), b_new.to(current[b].dtype)
        return out
