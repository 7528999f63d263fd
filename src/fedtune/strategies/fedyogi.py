"""FedYogi (Reddi et al., 2021, Algorithm 2, after Zaheer et al., 2018; the shared update is in
adaptive.py): v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2), so v moves
additively (not multiplicatively) toward Delta_t^2. Defaults beta1 = 0.9, beta2 = 0.99,
tau = 1e-3; set ``fed.server_lr`` (the paper's best lie near 10^-2..10^-1)."""

from __future__ import annotations

import torch

from .adaptive import AdaptiveServer


class FedYogi(AdaptiveServer):
    name = "fedyogi"

    def second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
