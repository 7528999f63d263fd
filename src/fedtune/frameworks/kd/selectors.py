"""Public-set pruning (``kd.public_per_round = M``, ``kd.select``): each round uses and sends M
public examples, the highest scored by the round's selector (``SELECTORS``), ties and unscored
rounds at random. A selector is stateless: the scores live in the framework (checkpointed), and
the selector updates them after the uploads (b4) or after the global model's outputs (b6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...training import derive_seed
from .losses import entropy


def select_examples(n: int, m: int, scores: torch.Tensor | None, seed: int, rnd: int) -> torch.Tensor:
    """The ``m`` public examples (sorted ids) of round ``rnd``: the highest ``scores``; ties, and
    every example when there are no scores yet (round 1), in a random order seeded by
    (seed, round). An example never scored (NaN) counts as the mean of those scored."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "kd-select", rnd)))
    if not m or m >= n:
        return torch.arange(n)
    if scores is None:
        return perm[:m].sort().values
    s = scores.double().clone()
    seen = ~torch.isnan(s)
    s[~seen] = s[seen].mean() if seen.any() else 0.0
    order = torch.argsort(s[perm], descending=True, stable=True)
    return perm[order[:m]].sort().values


def per_example(row_values: torch.Tensor, row_count: torch.Tensor) -> torch.Tensor:
    """Mean of each example's rows (classify has one row per example, generate one per answer token)."""
    example = torch.repeat_interleave(torch.arange(len(row_count)), row_count)
    total = torch.zeros(len(row_count), dtype=torch.float64).index_add_(0, example, row_values.double())
    return total / row_count.clamp_min(1)


def disagreement(probs: list[torch.Tensor]) -> torch.Tensor:
    """The clients' generalised Jensen-Shannon divergence per row: H(mean p) - mean H(p), in nats
    (0 when every client says the same)."""
    stacked = torch.stack([p.double() for p in probs])
    return (entropy(stacked.mean(0)) - entropy(stacked).mean(0)).clamp_min(0)


class Selector:
    """``random``: no scores; every round a fresh seeded sample."""

    needs_global_outputs = False  # whether b6 must run for the scores even when clients do not distil

    def after_uploads(self, scores: torch.Tensor | None, examples: torch.Tensor, probs: list[torch.Tensor],
                      row_count: torch.Tensor) -> torch.Tensor | None:
        """The scores once the clients' distributions on ``examples`` are in."""
        return scores

    def after_global(self, scores: torch.Tensor | None, outputs: torch.Tensor,
                     row_count: torch.Tensor) -> torch.Tensor | None:
        """The scores once the global model's outputs on every public row are in."""
        return scores


class EntropySelector(Selector):
    """``entropy``: the examples the global model is least sure of (entropy at T = 1)."""

    needs_global_outputs = True

    def after_global(self, scores, outputs, row_count):
        return per_example(entropy(F.softmax(outputs, -1)), row_count)


class DisagreementSelector(Selector):
    """``disagreement``: the examples the clients disagreed on most when last sent; scored now,
    ranked when the next round's examples are chosen."""

    def after_uploads(self, scores, examples, probs, row_count):
        if scores is None:
            scores = torch.full((len(row_count),), float("nan"), dtype=torch.float64)
        scores[examples] = per_example(disagreement(probs), row_count[examples])
        return scores


SELECTORS: dict[str, type[Selector]] = {"random": Selector, "entropy": EntropySelector,
                                         "disagreement": DisagreementSelector}
