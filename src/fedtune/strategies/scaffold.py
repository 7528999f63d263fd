"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1). The server keeps a control variate c, each client its own c_i (client
state: it survives resume with the other client states). Each round:

  down    x and c                              (c travels as extra tensors: its bytes count)
  client  every local step uses the gradient g - c_i + c;
          afterwards c_i+ = the mean of the raw minibatch gradients g along the local steps,
          which is the paper's option II, c_i - c + (x - y) / (K * lr), written so that it holds
          for any local optimizer (the two are equal for SGD); c_i <- c_i+
  up      y and Delta c_i = c_i+ - c_i
  server  x <- x + server_lr * (mean_i y_i - x)    (sample-weighted like FedAvg; the paper's
                                                    global step size eta_g is ``fed.server_lr``)
          c <- c + (1 / N) * sum_i Delta c_i       (N = ``fed.clients``: c stays the mean of all c_i)

c and every c_i start at zero, so round 1 (and any round with zero variates) is FedAvg."""

from __future__ import annotations

import torch

from .base import LocalRule, State, Strategy, pseudo_gradient

STATE_KEY = "scaffold_c"  # the client's c_i in its ClientResult.state


class Scaffold(Strategy):
    name = "scaffold"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lr, self.num_clients = cfg.fed.server_lr, cfg.fed.clients
        self.c: State = {}

    def downlink(self, current, cid):
        if not self.c:
            self.c = {k: torch.zeros_like(v) for k, v in current.items()}
        return dict(self.c)

    def client_rule(self, extras, state, params):
        return ScaffoldRule(params, extras, (state or {}).get(STATE_KEY))

    def receive(self, extras):
        for dc in extras:
            for k in self.c:
                self.c[k] = self.c[k] + dc[k].to(self.c[k].dtype) / self.num_clients

    def aggregate(self, current, updates):
        delta = pseudo_gradient(current, updates)
        return {k: current[k] + self.lr * delta[k] for k in current}

    def state_dict(self):
        return {"c": self.c}

    def load_state_dict(self, state):
        self.c = state["c"]


class ScaffoldRule(LocalRule):
    def __init__(self, params: dict[str, torch.nn.Parameter], c: State, c_i: State | None):
        self.params = params
        self.c_i = c_i if c_i is not None else {k: torch.zeros_like(v) for k, v in c.items()}
        self.correction = {k: (c[k] - self.c_i[k]).to(p.device, p.dtype) for k, p in params.items()}
        self.grad_sum = {k: torch.zeros_like(p) for k, p in params.items()}
        self.steps = 0

    @torch.no_grad()
    def on_grad(self):
        for k, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.grad_sum[k] += p.grad
            p.grad += self.correction[k]
        self.steps += 1

    def new_c_i(self) -> State:
        if not self.steps:
            return self.c_i
        return {k: (g / self.steps).cpu().to(self.c_i[k].dtype) for k, g in self.grad_sum.items()}

    def upload(self):
        new = self.new_c_i()
        return {k: new[k] - self.c_i[k] for k in new}

    def state(self):
        return {STATE_KEY: self.new_c_i()}
