"""``dual_lora`` (a shared adapter plus a personal one, summed, as in FedDPA / FDLoRA). Two
LoRA adapters on the same weights sum as one adapter of their joint rank:

    B_s A_s + B_p A_p = [B_s  B_p] [A_s; A_p],

so the model's rank-``model.lora_r`` adapter holds both: its leading lora_r/2 components are
the shared adapter (averaged; the only LoRA that travels), its trailing lora_r/2 the client's own.
Both are scaled by lora_alpha / lora_r. A new client's personal B is zero: it starts as the
global model. The server's global model is the shared adapter alone."""

from __future__ import annotations

import torch

from ..adapters import lora_state as lora
from .base import Personalization


class DualLoRA(Personalization):
    name = "dual_lora"
    active = True

    @property
    def half(self) -> int:
        return self.cfg.model.lora_r // 2

    def split(self, state):
        shared = lora.resize(state, self.half)
        personal = {}
        for a, b in lora.pairs(state).values():
            personal[a] = state[a][self.half:].clone()
            personal[b] = state[b][:, self.half:].clone()
        return shared, personal

    def merge(self, shared, personal):
        out = dict(lora.resize(shared, self.half))
        for a, b in lora.pairs(out).values():
            if a in personal:
                out[a] = torch.cat([out[a], personal[a].to(out[a].dtype)], 0)
                out[b] = torch.cat([out[b], personal[b].to(out[b].dtype)], 1)
        return out

    def down(self, state):
        return lora.resize(state, self.half)

    def start(self, state):
        shared, personal = self.split(state)
        # a new client's personal adapter adds nothing until it trains: its B is zero
        self.init = {k: torch.zeros_like(v) if lora.B_KEY in k else v for k, v in personal.items()}
        return shared
