"""FedProx's proximal term (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"):
the client minimises loss + mu/2 * ||w - w_global||^2 over the tunable parameters, which adds
mu * (w - w_global) to each step's gradient. A client-side rule under any server strategy
(``fed.prox_mu``; 0 = off): fedprox is fedavg with prox_mu > 0."""

from __future__ import annotations

import torch

from .base import LocalRule, State


class Proximal(LocalRule):
    def __init__(self, params: dict[str, torch.nn.Parameter], anchor: State, mu: float):
        self.params, self.mu = params, mu
        self.anchor = {k: anchor[k].detach().to(p.device, p.dtype).clone() for k, p in params.items()}

    @torch.no_grad()
    def on_grad(self):
        for k, p in self.params.items():
            term = self.mu * (p - self.anchor[k])
            if p.grad is None:
                p.grad = term
            else:
                p.grad += term
