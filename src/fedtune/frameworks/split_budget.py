"""Adaptive activation compression for split learning under a traffic budget (``split.act_budget_mb``).

Each batch's packed activations (real tokens x hidden) are sent at the most precise *rung* of a
fixed ladder whose serialized message fits the batch's share of the round's budget: the bytes
left in the round divided by the batches left (what a batch saves is spent by the next ones).
A rung gives the tokens, ranked by the L2 norm of their activation (largest first), to tiers of
falling precision:

    fp32 dense  >  fp16 dense  >  int8 dense (a scale per token)  >  int8 top-k  >  dropped

The rule "most precision to the largest-norm tokens" follows the observation that a few tokens
carry most of a transformer's activation mass and attention (the first/[CLS] token, delimiters:
Sun et al., 2024, "Massive activations in large language models"); the many low-norm tokens are
the ones compressed or, at the last rungs, not sent (the server sees zeros there). A batch that
fits no rung goes at the last one and is counted in ``act_over_budget_batches``.

Rung 0 (all fp32) is sent in the plain format of ``split.act_dtype = fp32``, so a generous budget
is exactly today's dense fp32 split. Every other rung uses the tiered format: ``act.tiers``
[tokens, width, n_fp32, n_fp16, n_int8, n_sparse], ``act.order`` (the sent tokens, by falling
norm) and one group of tensors per non-empty tier. The server returns the activations' gradient
in the same layout (each tier at its precision, top-k entries only, nothing for dropped tokens).
"""

from __future__ import annotations

import math

import torch

from .. import compression

TIERS = ("f32", "f16", "i8", "sp")
DTYPES = {"f32": "fp32", "f16": "fp16", "i8": "int8", "sp": "int8"}

# (fp32, fp16, int8, int8 top-k) shares of the tokens, the top-k fraction of a sparse token's
# values; the rest of the tokens is dropped. Ordered from most to fewest bytes.
RUNGS: tuple[tuple[float, float, float, float, float], ...] = (
    (1.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 0.0, 0.0),
    (0.0, 0.5, 0.5, 0.0, 0.0),
    (0.0, 0.25, 0.75, 0.0, 0.0),
    (0.0, 0.1, 0.9, 0.0, 0.0),
    (0.0, 0.0, 1.0, 0.0, 0.0),
    (0.0, 0.0, 0.5, 0.5, 0.25),
    (0.0, 0.0, 0.25, 0.75, 0.1),
    (0.0, 0.0, 0.1, 0.9, 0.05),
    (0.0, 0.0, 0.1, 0.4, 0.05),
    (0.0, 0.0, 0.05, 0.2, 0.05),
)
RECORD = ("act_tokens_fp32", "act_tokens_fp16", "act_tokens_int8", "act_tokens_sparse", "act_tokens_dropped")


def counts(tokens: int, rung: int) -> list[int]:
    """Tokens per tier (fp32, fp16, int8, sparse) for ``tokens`` tokens; cumulative shares are
    rounded up, so a rung that sends every token sends every token."""
    shares = RUNGS[rung][:4]
    bounds = [min(tokens, math.ceil(round(sum(shares[: i + 1]) * tokens, 9))) for i in range(4)]
    return [b - a for a, b in zip([0, *bounds[:-1]], bounds)]


def _tier_rows(x: torch.Tensor, order: torch.Tensor, counts: list[int]):
    """(tier, its rows of ``x``) for each non-empty tier, the tokens taken in ``order``."""
    start = 0
    for tier, count in zip(TIERS, counts):
        if count:
            yield tier, x[order[start:start + count]]
        start += count


def encode(x: torch.Tensor, rung: int, prefix: str) -> dict[str, torch.Tensor]:
    """Packed activations (tokens, width) at ``rung``."""
    if rung == 0:
        return compression.quantize(x, "fp32", prefix)
    tokens, width = x.shape
    n = counts(tokens, rung)
    order = x.detach().float().norm(dim=-1).argsort(descending=True, stable=True)[: sum(n)]
    out = {f"{prefix}tiers": torch.tensor([tokens, width, *n], dtype=torch.int32),
           f"{prefix}order": order.to(torch.int32)}
    for tier, rows in _tier_rows(x, order, n):
        if tier == "sp":
            k = max(1, math.ceil(RUNGS[rung][4] * width))
            out.update(compression.topk_encode(rows, k, "int8", f"{prefix}{tier}.", magnitude=True))
        else:
            out.update(compression.quantize(rows, DTYPES[tier], f"{prefix}{tier}."))
    return out


def encode_like(grad: torch.Tensor, layout: dict[str, torch.Tensor], lprefix: str, prefix: str) -> dict[str, torch.Tensor]:
    """The gradient of activations that arrived as ``layout``, in the same layout: each tier at
    its precision, the kept entries of sparse tokens only, nothing for dropped tokens."""
    if f"{lprefix}tiers" not in layout:
        return compression.quantize(grad, "fp32", prefix)
    n = layout[f"{lprefix}tiers"][2:].tolist()
    order = layout[f"{lprefix}order"].long().to(grad.device)
    out = {}
    for tier, rows in _tier_rows(grad, order, n):
        if tier == "sp":
            rows = rows.gather(-1, layout[f"{lprefix}sp.index"].long().to(grad.device))
        out.update(compression.quantize(rows, DTYPES[tier], f"{prefix}{tier}."))
    return out


def decode(t: dict[str, torch.Tensor], prefix: str, layout: dict[str, torch.Tensor] | None = None,
           lprefix: str | None = None) -> torch.Tensor:
    """-> dense float32 (tokens, width), zeros where nothing was sent. ``layout`` (and its
    prefix) is the activations' message when ``t`` is a gradient in their layout."""
    layout, lprefix = (t, prefix) if layout is None else (layout, lprefix)
    if f"{lprefix}tiers" not in layout:
        return compression.dequantize(t, prefix)
    tokens, width, *n = layout[f"{lprefix}tiers"].tolist()
    order = layout[f"{lprefix}order"].long()
    out, start = torch.zeros(tokens, width), 0
    for tier, count in zip(TIERS, n):
        rows = order[start:start + count]
        start += count
        if not count:
            continue
        values = compression.dequantize(t, f"{prefix}{tier}.")
        if tier == "sp":
            index = layout[f"{lprefix}sp.index"].long()
            values = torch.zeros(count, width).scatter_(-1, index, values)
        out[rows] = values
    return out


def tally(record: dict[str, int], t: dict[str, torch.Tensor], prefix: str, tokens: int) -> None:
    """Add one batch's tokens per tier to ``record`` (the client record's chosen settings)."""
    n = t[f"{prefix}tiers"][2:].tolist() if f"{prefix}tiers" in t else [tokens, 0, 0, 0]
    for key, count in zip(RECORD, [*n, tokens - sum(n)]):
        record[key] = record.get(key, 0) + count
