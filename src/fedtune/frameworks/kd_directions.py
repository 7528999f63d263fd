"""The research directions of KD-FedLLM (the framework-comparison paper, section IV.B), as the
pure functions kd.py calls; docs/kd.md ("Research directions") says what each one measured.

- alignment (``kd.align``): each public row's distillation weight is the ratio of the clients'
  pooled label distribution (from the histograms they upload) to the public set's;
- pruning (``kd.public_per_round``, ``kd.select``): the M public examples a round uses, chosen
  at random, by the global model's entropy or by the clients' disagreement;
- logit dimension reduction (``kd.logit_rank``): a rank-k SVD code of the row-centred logits;
- clustered aggregation (``kd.aggregation = "cluster"``): clients grouped by their outputs,
  each group's mean counting equally."""

from __future__ import annotations

import torch

from ..compression import dequantize, quantize
from ..training import derive_seed

# --------------------------------------------------------------------------- alignment


def label_histogram(labels: list[int], num_labels: int) -> torch.Tensor:
    """What a client uploads for alignment: its private rows per label (int32)."""
    return torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_labels).to(torch.int32)


def align_weights(pooled: torch.Tensor, public_labels: list[int], clip: float = 0.0) -> torch.Tensor:
    """Per public example: w_i = p_clients(y_i) / p_public(y_i), the importance weight that makes
    the public rows' label distribution the clients' pooled one, scaled so that the examples
    kept (w > 0) average 1. An example whose label no client holds gets 0 and is left out.

    ``clip`` > 0 truncates the weights (truncated importance sampling, Ionides 2008): each is cut
    at ``clip`` times their mean (1 after the scaling), then the kept examples are scaled to
    average 1 again. A label with one or two public rows and many private ones would otherwise
    get a weight many times the mean and dominate the server's distillation; the price is a
    bias back towards the public distribution on exactly those labels."""
    target = pooled.double() / pooled.double().sum()
    labels = torch.tensor(public_labels, dtype=torch.long)
    public = torch.bincount(labels, minlength=len(target)).double() / len(labels)
    w = target[labels] / public[labels]
    kept = w > 0
    if not kept.any():
        return w.float()
    w = w / w[kept].mean()
    if clip:
        w = w.clamp(max=clip)
        w = w / w[kept].mean()
    return w.float()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() / p.double().sum() - q.double() / q.double().sum()).abs().sum())


# --------------------------------------------------------------------------- pruning


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
    h = lambda p: -torch.xlogy(p, p).sum(-1)  # noqa: E731
    stacked = torch.stack([p.double() for p in probs])
    return (h(stacked.mean(0)) - h(stacked).mean(0)).clamp_min(0)


# --------------------------------------------------------------------------- low-rank logits


def lowrank_encode(logits: torch.Tensor, k: int, dtype: str) -> dict[str, torch.Tensor]:
    """Rank-k code of ``logits`` (rows x width): each row is centred first (softmax ignores a row's
    shift, so the rank spent on it is saved), then X_c ~ (U_k S_k) V_k^T. Sent: the coefficients
    U_k S_k (rows x k) and the client's own basis V_k^T (k x width), each in ``dtype``."""
    x = logits.double()
    x = x - x.mean(-1, keepdim=True)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, len(s))
    return {**quantize((u[:, :k] * s[:k]).float(), dtype, "coef_"), **quantize(vh[:k].float(), dtype, "basis_")}


def lowrank_decode(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return dequantize(t, "coef_") @ dequantize(t, "basis_")


def lowrank_error(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> float:
    """||X_c - decode(code)||_F / ||X_c||_F on the row-centred logits, after quantisation too."""
    x = logits.double()
    x = x - x.mean(-1, keepdim=True)
    return float(torch.linalg.norm(x - lowrank_decode(t).double()) / torch.linalg.norm(x).clamp_min(1e-12))


# --------------------------------------------------------------------------- clustered aggregation


def cluster_clients(probs: list[torch.Tensor], k: int) -> list[int]:
    """Group the clients by their outputs: average-linkage agglomerative clustering (SciPy) of the
    flattened distributions, Euclidean, cut at k clusters. Deterministic; clusters are numbered
    in the order their first member appears."""
    if len(probs) <= k:
        return list(range(len(probs)))
    from scipy.cluster.hierarchy import fcluster, linkage

    x = torch.stack([p.double().flatten() for p in probs]).numpy()
    raw = fcluster(linkage(x, method="average", metric="euclidean"), t=k, criterion="maxclust").tolist()
    first = {c: i for i, c in reversed(list(enumerate(raw)))}
    names = {c: n for n, c in enumerate(sorted(first, key=first.get))}
    return [names[c] for c in raw]


def cluster_refine(probs: list[torch.Tensor], k: int) -> tuple[torch.Tensor, list[int]]:
    """b4 with clusters: the mean of each cluster's clients, then the mean over clusters with one
    weight per cluster, so k similar clients cannot outvote a dissimilar one. -> (teacher, cluster
    of each client)."""
    assign = cluster_clients(probs, k)
    means = [torch.stack([p.double() for p, a in zip(probs, assign) if a == c]).mean(0) for c in sorted(set(assign))]
    return torch.stack(means).mean(0).float(), assign
