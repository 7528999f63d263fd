"""DP-SGD's batches under ``privacy.sampler = poisson`` (the sampling the accountant assumes,
Abadi et al., 2016; Opacus's ``UniformWithReplacementSampler`` is the same rule): in each step
every record joins the batch independently with probability q = batch_size / n, so batch sizes
follow Binomial(n, q) and may be empty; an epoch is round(1/q) steps. The draws come from a
generator seeded by (run seed, round, client, epoch), so a resumed run draws the same batches."""

from __future__ import annotations

import torch

from .. import data as datalib
from ..data import Batch
from ..training import derive_seed


def sample_rate(batch_size: int, n_records: int) -> float:
    return min(1.0, batch_size / max(n_records, 1))


def steps_per_epoch(batch_size: int, rows: int) -> int:
    """round(rows / batch_size), at least 1: round(1/q) when a step may draw from all rows;
    split.samples_per_round caps ``rows`` (fewer steps, the same q)."""
    return max(1, round(rows / batch_size))


def draws(seed: int, rnd: int, cid: int, epoch: int, n: int, q: float, steps: int) -> list[list[int]]:
    """Each step's rows: record i joins step t when the (t, i)-th uniform draw is below q."""
    g = torch.Generator().manual_seed(derive_seed(seed, "poisson", rnd, cid, epoch))
    joined = torch.rand((steps, n), generator=g, dtype=torch.float64) < q
    return [torch.nonzero(row).flatten().tolist() for row in joined]


def empty_batch(labels: list) -> Batch:
    shape = tuple(labels[0].shape) if labels and isinstance(labels[0], torch.Tensor) else ()
    ids = torch.zeros((0, 1), dtype=torch.long)
    return Batch(ids, ids.clone(), torch.zeros((0, *shape), dtype=torch.long), torch.zeros(0, dtype=torch.long))


def poisson_batches(ids: list[list[int]], labels: list, batch_size: int, pad_id: int, padding: str,
                    max_length: int, seed_parts: tuple[int, int, int, int], limit: int = 0) -> list[Batch]:
    """One epoch of Poisson batches over the rows; ``seed_parts`` = (seed, round, client, epoch)."""
    n = len(ids)
    q = sample_rate(batch_size, n)
    steps = steps_per_epoch(batch_size, min(limit, n) if limit else n)
    out = []
    for rows in draws(*seed_parts, n, q, steps):
        if not rows:
            out.append(empty_batch(labels))
            continue
        lab = [labels[i] for i in rows]
        if isinstance(lab[0], torch.Tensor):
            lab = torch.stack(lab)
        out.append(datalib.collate([ids[i] for i in rows], lab, rows, pad_id, padding, max_length))
    return out
