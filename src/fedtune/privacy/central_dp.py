"""Client-level DP at the server, ``privacy.central_dp`` (DP-FedAvg, McMahan et al., 2018):
each client joins a round independently with probability q = fed.fraction
(runtimes/rounds.sample_clients); each joining client's update (its state minus the global
state) is clipped to L2 norm ``privacy.update_clip``, the clipped updates are summed, Gaussian
noise of std update_noise_multiplier x update_clip is added to the sum, and the sum is divided
by the expected number of clients per round, q x clients (fixed: not by who joined, so one
client's presence changes the result by at most clip / (q x clients)). Every client counts
equally, whatever its sample count. The noised mean update is then handed to ``fed.strategy``
as the one update of the round (FedAvg returns it; a server optimizer would step on it). The
accountant (``privacy.accountant``) counts one step per round at rate q, rounds no client
joined included; it is server state, checkpointed with the framework."""

from __future__ import annotations

import torch

from ..strategies.norm_bound import clip_update
from ..training import seeded
from .accounting import Accountant, calibrate, default_delta

State = dict[str, torch.Tensor]


class CentralDP:
    def __init__(self, cfg):
        p, fed = cfg.privacy, cfg.fed
        self.seed, self.kind = cfg.seed, p.accountant
        self.clip = p.update_clip
        self.sample_rate = min(1.0, fed.fraction)
        self.per_round = self.sample_rate * fed.clients  # the fixed denominator: expected clients a round
        self.delta = p.delta or default_delta(fed.clients)
        self.noise_multiplier = p.update_noise_multiplier
        if p.target_epsilon:
            self.noise_multiplier = calibrate(p.target_epsilon, self.delta, self.sample_rate, fed.rounds, p.accountant)
        self.accountant = Accountant(kind=p.accountant)

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
        return [(out, 1.0)], self.record()

    def skip(self) -> dict:
        """A round no client joined: the model stays, the accountant counts the round."""
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return self.record()

    def record(self) -> dict:
        return {"epsilon": self.accountant.epsilon(self.delta), "delta": self.delta,
                "update_noise_multiplier": self.noise_multiplier, "noise_multiplier": self.noise_multiplier,
                "dp_steps": self.accountant.steps, "sample_rate": self.sample_rate, "accountant": self.kind}

    def state_dict(self) -> dict:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.accountant = Accountant(state, self.kind)


def make(cfg) -> CentralDP | None:
    return CentralDP(cfg) if cfg.privacy.central_dp else None
