"""The distillation loss and the weight each public row teaches with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...config import KDConfig


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || softmax(student / T)), averaged over rows. With ``weight``, row i
    counts w_i * KL_i and the mean is over the rows with w_i > 0: a dropped row (0) is left out,
    and a row of weight 0.2 teaches a fifth of a full one, so low weights everywhere mean a
    small loss, not a renormalised one. The T^2 keeps the gradient's scale independent of T
    (Hinton et al., 2015).

    A teacher one column wider than the student is a top-k teacher in buckets
    (codecs.topk_decode_buckets): the KL is over its nonzero entries and one rest bucket,
    whose student probability is the student's mass on every other entry, so the student is
    asked to match the kept probabilities and the total left over, not any shape of its tail."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_probs.shape[-1] == log_q.shape[-1] + 1:
        kept, rest = teacher_probs[..., :-1], teacher_probs[..., -1]
        sent = kept > 0
        # a row with every entry sent has an empty rest: keep its logsumexp finite (NaN-free gradient)
        log_q_rest = torch.logsumexp(log_q.masked_fill(sent & ~sent.all(-1, keepdim=True), float("-inf")), dim=-1)
        rest_term = torch.where(rest > 0, torch.xlogy(rest, rest) - rest * log_q_rest, torch.zeros_like(rest))
        kl = (torch.xlogy(kept, kept) - kept * log_q).sum(-1) + rest_term
    else:
        kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum(-1)
    if weight is None:
        return temperature**2 * kl.mean()
    return temperature**2 * (kl * weight).sum() / (weight > 0).sum().clamp_min(1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row, in nats."""
    return -torch.xlogy(probs, probs).sum(-1)


def confidence(probs: torch.Tensor) -> torch.Tensor:
    """1 - H(p) / ln(width) per row: 0 for a uniform distribution, 1 for a one-hot one."""
    return (1 - entropy(probs.double()) / math.log(probs.shape[-1])).clamp(0, 1).float()


def row_weights(teacher: torch.Tensor, keep: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """Each public row's distillation weight: kept or not, times (``kd.confidence_weighting``)
    the teacher's confidence in its own prediction, taken at T = 1 because softmax(z / T)^T is
    proportional to softmax(z)."""
    if not cfg.confidence_weighting:
        return keep.float()
    own = teacher.double() ** cfg.temperature
    return keep.float() * confidence(own / own.sum(-1, keepdim=True))
