"""The kd section: knowledge distillation over a public set (docs/kd.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FedtuneError
from .checks import one_of


@dataclass
class KDConfig:
    temperature: float = 2.0  # softmax temperature of distillation
    aggregation: str = "mean"  # "mean", "weighted" (by client samples), "entropy" or "cluster" (see clusters)
    entropy_threshold: float = 0.0  # with "entropy": drop public samples above this (nats)
    server_epochs: int = 1  # the server's distillation passes over the public set per round
    server_lr: float = 1e-3  # the server's distillation step size
    client_eval_size: int = 200  # clients' own test accuracy on this many test rows
    logit_topk: int = 0  # 0 = send all logits
    logit_dtype: str = "fp32"  # fp32, fp16, int8
    client_kd_weight: float = 0.5  # lambda: client loss = lambda * KD (public) + (1 - lambda) * CE (private)
    confidence_weighting: bool = False  # weight each public row by 1 - H(teacher) / ln(width) (docs/kd.md)
    # Research directions (docs/kd.md, "Research directions").
    align: bool = False  # clients upload label histograms; the server weights public rows to their pooled distribution
    public_per_round: int = 0  # M public examples used and sent per round; 0 = all
    select: str = "random"  # how the M are chosen: "random", "entropy" or "disagreement"
    logit_rank: int = 0  # > 0: send a rank-k SVD code of the (row-centred) logits; 0 = off
    clusters: int = 2  # aggregation = "cluster": groups of clients by the similarity of their outputs
    # What a receiver of top-k probabilities does with the mass not sent: "bucket" keeps it as one
    # rest bucket in the KL; "uniform" spreads it evenly over the other entries (docs/kd.md).
    topk_tail: str = "bucket"
    # How the server merges clients' top-k uploads that name different classes: "bucket" averages
    # the kept entries and the rest buckets as sent; "class" first spreads each client's rest mass
    # over the classes it did not send, in proportion to the server's own outputs (docs/kd.md).
    topk_merge: str = "bucket"
    align_clip: float = 2.0  # kd.align: cut each weight at this times the mean, then renormalise; 0 = no cut


def validate(cfg: Any) -> None:
    kd = cfg.kd
    one_of("kd.aggregation", kd.aggregation, ("mean", "weighted", "entropy", "cluster"))
    one_of("kd.logit_dtype", kd.logit_dtype, ("fp32", "fp16", "int8"))
    if kd.temperature <= 0 or kd.logit_topk < 0 or kd.server_epochs < 0:
        raise FedtuneError("kd.temperature must be > 0; kd.logit_topk, kd.server_epochs >= 0")
    one_of("kd.topk_tail", kd.topk_tail, ("bucket", "uniform"))
    one_of("kd.topk_merge", kd.topk_merge, ("bucket", "class"))
    if kd.topk_merge == "class" and not (kd.logit_topk and kd.topk_tail == "bucket"):
        raise FedtuneError("kd.topk_merge=class merges top-k uploads in buckets: it needs kd.logit_topk > 0 and "
                           "kd.topk_tail = \"bucket\"")
    if not 0.0 <= kd.client_kd_weight < 1.0:
        raise FedtuneError(f"kd.client_kd_weight must be in [0, 1) (0 = clients do not distil); got {kd.client_kd_weight}")
    if kd.aggregation == "entropy" and kd.entropy_threshold <= 0:
        raise FedtuneError("kd.aggregation=entropy needs kd.entropy_threshold > 0 (nats; ln(labels) keeps everything)")
    _validate_directions(cfg)


def _validate_directions(cfg: Any) -> None:
    """kd's research directions (docs/kd.md)."""
    kd, d = cfg.kd, cfg.data
    one_of("kd.select", kd.select, ("random", "entropy", "disagreement"))
    if kd.public_per_round < 0 or 0 <= d.public_size < kd.public_per_round:  # auto (-1): checked once resolved
        raise FedtuneError(f"kd.public_per_round must be in [0, data.public_size={d.public_size}] (0 = all); "
                           f"got {kd.public_per_round}")
    if kd.select != "random" and not kd.public_per_round:
        raise FedtuneError(f"kd.select={kd.select} chooses among public rows: it needs kd.public_per_round > 0")
    if kd.logit_rank < 0:
        raise FedtuneError(f"kd.logit_rank must be >= 0 (0 = off); got {kd.logit_rank}")
    if kd.logit_rank and kd.logit_topk:
        raise FedtuneError(f"kd.logit_rank={kd.logit_rank} codes the dense logits; it does not combine with "
                           f"kd.logit_topk={kd.logit_topk} (set one of them to 0)")
    if kd.clusters < 1 or (kd.aggregation == "cluster" and kd.clusters > cfg.fed.clients):
        raise FedtuneError(f"kd.clusters must be in [1, fed.clients={cfg.fed.clients}]; got {kd.clusters}")
    # kd.align_clip: a value other than the default does nothing without kd.align.
    clip, default = kd.align_clip, KDConfig.align_clip
    if not 0.0 <= clip < float("inf"):
        raise FedtuneError(f"kd.align_clip must be a finite number >= 0 (times the mean weight; 0 = no clipping); "
                           f"got {clip}")
    if clip != default and not kd.align:
        raise FedtuneError(f"kd.align_clip={clip} clips kd.align's weights: it needs kd.align = true")
