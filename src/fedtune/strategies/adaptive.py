"""The adaptive server optimizers of Reddi et al., 2021 ("Adaptive Federated Optimization",
Algorithm 2), on the pseudo-gradient Delta_t = mean_i(x_i) - x_t:

    m_t     = beta1 * m_{t-1} + (1 - beta1) * Delta_t                    (m_{-1} = 0)
    v_t     = <the method's second-moment update of v_{t-1} by Delta_t^2>  (v_{-1} = tau^2)
    x_{t+1} = x_t + server_lr * m_t / (sqrt(v_t) + tau)

with no bias correction, as in the paper. fedadam.py, fedyogi.py and fedadagrad.py each give
only their v update. Keys: ``fed.server_lr`` (eta), ``fed.beta1``, ``fed.beta2``, ``fed.tau``."""

from __future__ import annotations

import torch

from .base import State, Strategy, pseudo_gradient


class AdaptiveServer(Strategy):
    def __init__(self, cfg):
        super().__init__(cfg)
        f = cfg.fed
        self.lr, self.beta1, self.beta2, self.tau = f.server_lr, f.beta1, f.beta2, f.tau
        self.m: State = {}
        self.v: State = {}

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        delta = pseudo_gradient(current, updates)
        out = {}
        for k, d in delta.items():
            m = self.m.get(k, torch.zeros_like(d))
            v = self.v.get(k, torch.full_like(d, self.tau**2))
            self.m[k] = self.beta1 * m + (1 - self.beta1) * d
            self.v[k] = self.second_moment(v, d * d)
            out[k] = current[k] + self.lr * self.m[k] / (self.v[k].sqrt() + self.tau)
        return out

    def state_dict(self):
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.m, self.v = state["m"], state["v"]
