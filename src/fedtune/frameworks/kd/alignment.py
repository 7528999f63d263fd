"""Public-set alignment (``kd.align``, ``kd.align_clip``): each client adds its label histogram
to its upload, and the server weights each public row by the ratio of the clients' pooled label
distribution to the public set's, so the public rows it distils on carry the clients' label
distribution. ``ALIGNMENTS`` holds the two behaviours; ``make_alignment`` picks one."""

from __future__ import annotations

import torch

from ...config import KDConfig
from ...errors import FedtuneError


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


class NoAlignment:
    """Every public row keeps its weight; nothing extra is uploaded."""

    def __init__(self, cfg: KDConfig):
        self.cfg = cfg

    def upload(self, labels: list[int], num_labels: int) -> dict[str, torch.Tensor]:
        """What the client adds to its upload."""
        return {}

    def read(self, tensors: dict[str, torch.Tensor], num_labels: int) -> torch.Tensor | None:
        """The server's check of what ``upload`` added; raises FedtuneError on a bad upload."""
        return None

    def pool(self, hists: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None

    def example_weights(self, pooled: torch.Tensor | None, public_labels: list[int], num_labels: int,
                        record: dict) -> torch.Tensor:
        """The weight of each of the given public examples in the server's distillation."""
        return torch.ones(len(public_labels))


class LabelAlignment(NoAlignment):
    def upload(self, labels, num_labels):
        return {"label_hist": label_histogram(labels, num_labels)}

    def read(self, tensors, num_labels):
        hist = tensors.get("label_hist")
        if hist is None or tuple(hist.shape) != (num_labels,) or hist.is_floating_point() or (hist < 0).any():
            raise FedtuneError(f"kd.align needs a label_hist of {num_labels} non-negative integers")
        return hist.long()

    def pool(self, hists):
        return sum(hists)

    def example_weights(self, pooled, public_labels, num_labels, record):
        """w = p_clients(y) / p_public(y), clipped at ``kd.align_clip``. The server owns the public
        set, labels included, and uses them here."""
        w = align_weights(pooled, public_labels, self.cfg.align_clip)
        public = label_histogram(public_labels, num_labels)
        record["kd_align_tv"] = total_variation(pooled, public)  # the shift the weights undo
        record["kd_align_rows_kept"] = int((w > 0).sum())
        return w


ALIGNMENTS: dict[str, type[NoAlignment]] = {"off": NoAlignment, "labels": LabelAlignment}


def make_alignment(cfg: KDConfig) -> NoAlignment:
    return ALIGNMENTS["labels" if cfg.align else "off"](cfg)
