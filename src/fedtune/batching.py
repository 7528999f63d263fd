"""Tokenization and batching: token ids per text, and batches padded per batch (dynamic
padding) or to ``max_length``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length (no padding: that is done per batch)."""
    if not texts:
        return []
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    return enc["input_ids"]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # rows of the dataset this batch holds, for per-sample results

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)), self.index)

    @property
    def shape(self) -> tuple[int, int]:
        # The mask's: a split learning server has the mask and labels but not the token ids.
        return tuple(self.attention_mask.shape)


def collate(ids: list[list[int]], labels: list, rows: list[int], pad_id: int, padding: str, max_length: int) -> Batch:
    # Right padding: causal models attend only to earlier positions, so pad tokens change nothing
    # before them, and the classification heads pool the last non-pad token.
    width = max_length if padding == "max_length" else max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, seq in enumerate(ids):
        input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    label_t = labels if isinstance(labels, torch.Tensor) else torch.tensor(labels)
    return Batch(input_ids, mask, label_t, torch.tensor(rows, dtype=torch.long))


def batches(
    ids: list[list[int]],
    labels: list,
    batch_size: int,
    pad_id: int,
    padding: str = "dynamic",
    max_length: int = 80,
    shuffle_seed: int | None = None,
    limit: int = 0,
    by_length: bool = False,
) -> list[Batch]:
    """Batches over the rows; shuffled by shuffle_seed when given; the first ``limit`` rows only;
    ``by_length``: those rows sorted by length (evaluation: the least padding; each batch's
    ``index`` says which rows it holds)."""
    order = list(range(len(ids)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    if limit:
        order = order[:limit]
    if by_length:
        order.sort(key=lambda i: len(ids[i]))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lab = [labels[i] for i in rows]
        if lab and isinstance(lab[0], torch.Tensor):
            lab = torch.stack(lab)
        out.append(collate([ids[i] for i in rows], lab, rows, pad_id, padding, max_length))
    return out
