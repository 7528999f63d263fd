"""FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification"; the SGD-with-momentum server of Reddi et al., 2021): heavy-ball
momentum on the pseudo-gradient Delta_t = mean_i(x_i) - x_t,

    m_t     = beta * m_{t-1} + Delta_t          (m_0 = 0)
    x_{t+1} = x_t + server_lr * m_t

``fed.server_momentum`` is beta (default 0.9), ``fed.server_lr`` the server step (default 1.0;
Hsu et al. keep the effective step server_lr / (1 - beta) near 1). beta = 0 and server_lr = 1 is
FedAvg (to rounding)."""

from __future__ import annotations

from .base import State, Strategy, pseudo_gradient


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lr, self.beta = cfg.fed.server_lr, cfg.fed.server_momentum
        self.m: State = {}

    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State:
        delta = pseudo_gradient(current, updates)
        self.m = {k: self.beta * self.m[k] + d if k in self.m else d.clone() for k, d in delta.items()}
        return {k: current[k] + self.lr * self.m[k] for k in current}

    def state_dict(self):
        return {"m": self.m}

    def load_state_dict(self, state):
        self.m = state["m"]
