"""b4 on the server: the clients' decoded distributions -> one teacher distribution per public
row, and which rows it keeps. ``kd.aggregation`` picks the refiner from ``REFINERS``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...config import KDConfig
from .losses import entropy


@dataclass
class Refined:
    teacher: torch.Tensor  # one distribution per row
    keep: torch.Tensor  # bool per row: whether the server distils it
    record: dict = field(default_factory=dict)  # what the refiner adds to the server record


def _mean(probs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return (sum(p.double() * wi for p, wi in zip(probs, w)) / w.sum()).float()


def _keep_all(teacher: torch.Tensor) -> torch.Tensor:
    return torch.ones(len(teacher), dtype=torch.bool)


def mean(probs: list[torch.Tensor], weights: list[float], cids: list[int], cfg: KDConfig) -> Refined:
    teacher = _mean(probs, torch.tensor([1.0] * len(probs), dtype=torch.float64))
    return Refined(teacher, _keep_all(teacher))


def weighted(probs: list[torch.Tensor], weights: list[float], cids: list[int], cfg: KDConfig) -> Refined:
    """The mean weighted by each client's private rows (``weights``)."""
    teacher = _mean(probs, torch.tensor(weights, dtype=torch.float64))
    return Refined(teacher, _keep_all(teacher))


def entropy_filtered(probs: list[torch.Tensor], weights: list[float], cids: list[int], cfg: KDConfig) -> Refined:
    """The mean, keeping only the rows whose entropy is at most ``kd.entropy_threshold``."""
    teacher = mean(probs, weights, cids, cfg).teacher
    return Refined(teacher, entropy(teacher) <= cfg.entropy_threshold)


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
    """The mean of each cluster's clients, then the mean over clusters with one weight per
    cluster, so k similar clients cannot outvote a dissimilar one. -> (teacher, cluster of each
    client)."""
    assign = cluster_clients(probs, k)
    means = [torch.stack([p.double() for p, a in zip(probs, assign) if a == c]).mean(0) for c in sorted(set(assign))]
    return torch.stack(means).mean(0).float(), assign


def clustered(probs: list[torch.Tensor], weights: list[float], cids: list[int], cfg: KDConfig) -> Refined:
    """``kd.aggregation = "cluster"``: cluster_refine over ``kd.clusters`` groups; the record
    says which cluster each client fell in."""
    teacher, assign = cluster_refine(probs, cfg.clusters)
    return Refined(teacher, _keep_all(teacher), {"kd_clusters": {str(c): a for c, a in zip(cids, assign)}})


REFINERS = {"mean": mean, "weighted": weighted, "entropy": entropy_filtered, "cluster": clustered}


def refine(probs: list[torch.Tensor], weights: list[float], cfg: KDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured refiner on clients numbered 0.. -> (teacher, rows kept)."""
    out = REFINERS[cfg.aggregation](probs, weights, list(range(len(probs))), cfg)
    return out.teacher, out.keep
