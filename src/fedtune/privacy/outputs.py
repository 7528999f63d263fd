"""Noise on what kd and split send (``privacy.output_noise_multiplier`` > 0): the client clips
and noises its outputs before they leave, and accounts what that buys with the same accountant.

- split: each example's activations at the cut (all its tokens together) are clipped to L2
  norm ``privacy.output_clip`` and get Gaussian noise of std multiplier x clip per value. A
  record's activations are released once per local epoch; replacing the record moves them by
  at most 2 x clip, so each epoch is a Gaussian mechanism of noise multiplier sigma / 2
  (sampling rate 1: an upper bound when split.samples_per_round leaves it out). The labels
  cross the cut in the clear and are not covered.
- kd: each public row's logits are clipped to ``output_clip`` and noised. The public inputs are
  public, but the outputs depend on all of the client's private rows through its model, so no
  single record's influence is bounded: the guarantee is client-level (the whole private set
  replaced moves the payload by at most 2 x clip x sqrt(rows)), one release per round, noise
  multiplier sigma / (2 sqrt(rows)). It is weak unless sigma is large; DP-SGD is what gives kd
  record-level DP (its outputs are then post-processing)."""

from __future__ import annotations

import math

import torch

from .accounting import Accountant


def clip_and_noise(x: torch.Tensor, counts: list[int], clip: float, noise_multiplier: float) -> torch.Tensor:
    """``x``'s rows in consecutive groups of ``counts``: each group scaled to L2 norm at most
    ``clip`` as a whole, then N(0, (noise_multiplier x clip)^2) added to every value."""
    out, start = x.detach().clone().float(), 0
    for count in counts:
        group = out[start:start + count]
        group *= min(1.0, clip / max(float(group.double().norm()), 1e-12))
        start += count
    if noise_multiplier:
        out += torch.randn_like(out) * (noise_multiplier * clip)
    return out.to(x.dtype)


class OutputDP:
    """One client's output noise and its accountant (client state, like DP-SGD's)."""

    def __init__(self, cfg, n_records: int, state: dict | None = None):
        p = cfg.privacy
        self.clip, self.noise_multiplier = p.output_clip, p.output_noise_multiplier
        self.delta = p.delta or 1.0 / n_records
        self.accountant = Accountant(state)

    def activations(self, packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return clip_and_noise(packed, mask.sum(1).tolist(), self.clip, self.noise_multiplier)

    def account_epochs(self, epochs: int) -> None:
        self.accountant.step(self.noise_multiplier / 2, 1.0, epochs)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """kd: noise the public-set outputs and count the round's release."""
        self.accountant.step(self.noise_multiplier / (2 * math.sqrt(len(logits))), 1.0)
        return clip_and_noise(logits, [1] * len(logits), self.clip, self.noise_multiplier)

    def record(self) -> dict:
        return {"output_epsilon": self.accountant.epsilon(self.delta), "output_delta": self.delta}


def for_client(cfg, n_records: int, state: dict | None) -> OutputDP | None:
    if not cfg.privacy.output_noise_multiplier:
        return None
    return OutputDP(cfg, n_records, (state or {}).get("output_dp"))


def keep(odp: OutputDP | None, state: dict | None) -> dict | None:
    return state if odp is None else {**(state or {}), "output_dp": odp.accountant.state_dict()}
