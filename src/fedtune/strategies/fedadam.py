"""FedAdam (Reddi et al., 2021, Algorithm 2; the shared update is in adaptive.py):
v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2. Defaults beta1 = 0.9, beta2 = 0.99,
tau = 1e-3 (the paper's); set ``fed.server_lr`` (the paper's best lie near 10^-2..10^-1)."""

from __future__ import annotations

from .adaptive import AdaptiveServer


class FedAdam(AdaptiveServer):
    name = "fedadam"

    def second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2
