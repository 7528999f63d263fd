"""FlexLoRA (Bai et al., 2024): the server forms each client's full update B_i A_i (any rank),
takes their sample-weighted mean W, and factors it by SVD. The global adapter is W's best
rank-r_max approximation, split evenly: B = U sqrt(S), A = sqrt(S) V^T, in singular-value
order. A client of rank r_i gets the leading r_i components, which are W's best rank-r_i
factors (Eckart-Young: the leading singular triplets of the truncation are W's own), with
squared error the sum of the discarded squared singular values."""

from __future__ import annotations

from ..adapters.lora_state import pairs, products, rank, svd_factors, weighted
from .base import State
from .rank import RankStrategy


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
