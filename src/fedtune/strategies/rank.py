"""The base of strategies for clients of different LoRA ranks (hetlora, flexlora, flora): they
aggregate states of any ranks, say what each client receives, and record how far the global
adapter they built is from the exact mean of the clients' products. The algebra is in
adapters/lora_state.py."""

from __future__ import annotations

import torch

from ..adapters.lora_state import aggregation_error, merge_once, pairs, scaled_products, weighted
from .base import State, Strategy


class RankStrategy(Strategy):
    """Each client gets the leading components of the global adapter (``for_client``, the base's)."""

    @staticmethod
    def others_mean(updates: list[tuple[State, float]]) -> State:
        """The sample-weighted mean of the non-LoRA tensors (the classification head)."""
        lora_keys = {k for s, _ in updates for pair in pairs(s).values() for k in pair}
        keys = [k for k in updates[0][0] if k not in lora_keys]
        return {k: weighted([s[k] for s, _ in updates], [w for _, w in updates]).to(updates[0][0][k].dtype)
                for k in keys}

    def after_aggregate(self, model, global_state, updates, frozen):
        if not pairs({**frozen, **updates[0][0]}):
            return {}
        # The error of what this strategy built (0 for flora, the truncation for flexlora).
        return {"aggregation_error_global": aggregation_error(updates, global_state, frozen)}


class MergingStrategy(RankStrategy):
    """A rank strategy whose global adapter each client merges into its frozen weights (FLoRA).
    It counts its aggregations (each stack's merge tag) and keeps the merged weights themselves,
    so a resumed run restores them bit for bit (``restore``)."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.aggregations = 0
        self.merged: dict[str, torch.Tensor] = {}  # module -> its base weight after the merges

    def after_aggregate(self, model, global_state, updates, frozen):
        record = super().after_aggregate(model, global_state, updates, frozen)
        deltas = scaled_products(model, global_state)
        merge_once(model, deltas, self.aggregations)
        self.note_merged(model, deltas)
        return record

    def note_merged(self, model, modules) -> None:
        self.merged = {m: model.get_submodule(m).get_base_layer().weight.detach().clone() for m in modules}

    def restore(self, model) -> None:
        if not self.aggregations:  # nothing merged yet
            return
        with torch.no_grad():
            for m, weight in self.merged.items():
                model.get_submodule(m).get_base_layer().weight.copy_(weight)
        model._fedtune_merged = self.aggregations

    def state_dict(self):
        return {"aggregations": self.aggregations, "merged": self.merged}

    def load_state_dict(self, state) -> None:
        self.aggregations, self.merged = state["aggregations"], state["merged"]
