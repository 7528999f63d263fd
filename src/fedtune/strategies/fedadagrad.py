"""FedAdagrad (Reddi et al., 2021, Algorithm 2; the shared update is in adaptive.py):
v_t = v_{t-1} + Delta_t^2, with the paper's first moment m_t (beta1 = 0.9 by default; beta1 = 0
is plain Adagrad); ``fed.beta2`` is unused. tau = 1e-3 by default; set ``fed.server_lr`` (the
paper's best for Adagrad lie near 10^-1..10^0.5, higher than Adam's: v only grows)."""

from __future__ import annotations

from .adaptive import AdaptiveServer


class FedAdagrad(AdaptiveServer):
    name = "fedadagrad"

    def second_moment(self, v, d2):
        return v + d2
