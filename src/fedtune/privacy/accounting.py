"""Glue to Opacus's RDP accountant (Mironov, 2017; Mironov et al., 2019, for the subsampled
Gaussian mechanism): every epsilon fedtune reports comes from it. Its state is the history of
(noise multiplier, sampling rate, steps) and travels in client or server state, so a resumed run
keeps counting where it stopped."""

from __future__ import annotations

import math
import warnings

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier


class Accountant:
    def __init__(self, state: dict | None = None):
        self.rdp = RDPAccountant()
        if state:
            self.rdp.load_state_dict(state)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        for _ in range(steps):
            self.rdp.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.rdp.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta``: 0 before any step, inf once a step had no noise."""
        if not self.rdp.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.rdp.history):
            return math.inf
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
            warnings.simplefilter("ignore")
            return float(self.rdp.get_epsilon(delta))

    def state_dict(self) -> dict:
        return self.rdp.state_dict()


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus's precision) that keeps ``steps`` steps at
    ``sample_rate`` within (target_epsilon, delta)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=max(steps, 1), accountant="rdp"))
