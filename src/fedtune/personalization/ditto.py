"""``ditto`` (Li et al., 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", Algorithm 1). The client trains the global model as usual (uploaded) and, beside
it, a personal model v for ``fed.personal_epochs`` on

    F_k(v) + lambda/2 ||v - w||^2,   w = the global state it received this round,

so each personal step's gradient is the task gradient plus lambda (v - w) (``fed.ditto_lambda``).
v starts from the first global state the client receives and never leaves the client."""

from __future__ import annotations

import torch

from . import PERSONAL
from .base import WholeModel


class Ditto(WholeModel):
    name = "ditto"

    def personal_start(self, received, state):
        return (state or {}).get(PERSONAL) or received

    def rule(self, fw, received):
        lam = self.cfg.fed.ditto_lambda
        params = {n: p for n, p in fw.tunable_module().named_parameters() if p.requires_grad}
        anchor = {n: received[n].to(p.device, p.dtype) for n, p in params.items()}

        @torch.no_grad()
        def on_grad():
            for n, p in params.items():
                pull = lam * (p - anchor[n])
                p.grad = pull if p.grad is None else p.grad + pull

        return on_grad
