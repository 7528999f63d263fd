"""Client-level DP at the server, ``privacy.central_dp`` (DP-FedAvg, McMahan et al., 2018):
each sampled client's update (its state minus the global state) is clipped to L2 norm
``privacy.update_clip``, the clipped updates are summed, Gaussian noise of std
update_noise_multiplier x update_clip is added to the sum, and the sum is divided by the fixed
number of clients sampled per round (not by who answered, so one client's presence changes
the result by at most clip / k). Every client counts equally, whatever its sample count.
The noised mean update is then handed to ``fed.strategy`` as the one update of the round
(FedAvg returns it; a server optimizer would step on it). The accountant counts one step per
round at the client sampling rate; it is server state, checkpointed with the framework."""

from __future__ import annotations

import torch

from ..strategies.norm_bound import clip_update
from ..training import seeded
from .accounting import Accountant, calibrate

State = dict[str, torch.Tensor]


class CentralDP:
    def __init__(self, cfg):
        p, fed = cfg.privacy, cfg.fed
        self.seed = cfg.seed
        self.clip = p.update_clip
        self.per_round = max(1, round(fed.fraction * fed.clients))  # as rounds.sample_clients draws them
        self.sample_rate = self.per_round / fed.clients
        self.delta = p.delta or 1.0 / fed.clients
        self.noise_multiplier = p.update_noise_multiplier
        if p.target_epsilon:
            self.noise_multiplier = calibrate(p.target_epsilon, self.delta, self.sample_rate, fed.rounds)
        self.accountant = Accountant()

    def privatize(self, current: State, updates: list[tuple[State, float]]) -> tuple[list[tuple[State, float]], dict]:
        """-> ([(current + noised mean clipped update, 1.0)], the server record's privacy fields)."""
        clipped = [clip_update(s, current, self.clip) for s, _ in updates]
        rnd = self.accountant.steps  # rounds aggregated so far: the same noise after a resume
        out = {}
        with seeded(self.seed, "central-dp", rnd):
            for k, cur in current.items():
                total = sum(c[k].double() - cur.double() for c in clipped)
                total = total + torch.randn(cur.shape, dtype=torch.float64) * (self.noise_multiplier * self.clip)
                out[k] = (cur.double() + total / self.per_round).to(cur.dtype)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return [(out, 1.0)], {"epsilon": self.accountant.epsilon(self.delta), "delta": self.delta,
                              "update_noise_multiplier": self.noise_multiplier}

    def state_dict(self) -> dict:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.accountant = Accountant(state)


def make(cfg) -> CentralDP | None:
    return CentralDP(cfg) if cfg.privacy.central_dp else None
