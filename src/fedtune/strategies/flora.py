"""FLoRA (Wang et al., 2024): exact aggregation by stacking. With p_i the sample weights
(summing to 1), B = [p_1 B_1, ..., p_K B_K] and A = [A_1; ...; A_K] give B A = sum_i p_i B_i A_i,
the weighted mean of the clients' updates, with no cross terms. The stacked adapter (rank
sum_i r_i) is what the server sends down: each client merges scale * B A into its frozen
weights and starts a fresh rank-r_i adapter (A seeded, the same on every client; B = 0). That
downstream stack is the method's extra traffic, and it is in the serialized message.

Every client must merge every round's stack (``fed.fraction = 1``, checked by the config). The
server keeps the merged weights in its checkpoint, so a resumed run restores them exactly. (On
the flower runtime each SuperNode merges into its own copy; a resumed flower run starts fresh
SuperNodes whose weights are not merged: resume flora runs in-process or on flower-sim.)"""

from __future__ import annotations

import torch

from ..adapters.lora_state import MERGE, MERGE_TAG, pairs, resize, stack
from .base import State
from .rank import MergingStrategy


class FLoRA(MergingStrategy):
    name = "flora"

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        out = {**self.others_mean(updates), **stack(updates)}
        self.aggregations += 1
        return out

    def for_client(self, global_state: State, r: int) -> State:
        if not self.aggregations:  # round 1: the initial adapter, nothing to merge yet
            return resize(global_state, r)
        # A fresh adapter: A seeded per aggregation (std 1/r, as PEFT's gaussian init), B = 0.
        fresh = resize(resize(global_state, 0), r, seed=self.cfg.seed + self.aggregations, std=1.0 / r)
        stacked = {MERGE + k: global_state[k] for pair in pairs(global_state).values() for k in pair}
        return {**fresh, **stacked, MERGE_TAG: torch.tensor(self.aggregations)}
