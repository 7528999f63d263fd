"""Glue to Opacus's accountants for the subsampled Gaussian mechanism, ``privacy.accountant``:
``rdp`` (Rényi DP, Mironov, 2017; Mironov et al., 2019) or ``prv`` (privacy random variables,
Gopi et al., 2021: a numerically near-exact composition whose reported figure is its upper
bound, so it is tighter than rdp and still a guarantee). Every epsilon fedtune reports comes
from one of them. The state is the history of (noise multiplier, sampling rate, steps) and
travels in client or server state, so a resumed run keeps counting where it stopped."""

from __future__ import annotations

import math
import warnings

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

KINDS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def default_delta(n: int) -> float:
    """delta when privacy.delta is 0: 1 / (10 n), n the records (DP-SGD) or clients (central DP)
    one guarantee covers, below the 1/n at which releasing one record outright would pass."""
    return 1.0 / (10 * max(n, 1))


class Accountant:
    def __init__(self, state: dict | None = None, kind: str = "rdp"):
        self.kind = kind
        self.impl = KINDS[kind]()
        if state:
            self.impl.load_state_dict(state)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        hist = self.impl.history
        if hist and hist[-1][:2] == (noise_multiplier, sample_rate):
            hist[-1] = (noise_multiplier, sample_rate, hist[-1][2] + steps)  # Opacus's own merge, without a loop
        else:
            hist.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.impl.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta``: 0 before any step, inf once a step had no noise."""
        if not self.impl.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.impl.history):
            return math.inf
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
            warnings.simplefilter("ignore")
            return float(self.impl.get_epsilon(delta))

    def state_dict(self) -> dict:
        return self.impl.state_dict()


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's precision) that keeps ``steps`` steps at
    ``sample_rate`` within (target_epsilon, delta) under accountant ``kind``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=max(steps, 1), accountant=kind))
