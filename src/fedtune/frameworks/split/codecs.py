"""What crosses the cut, both ways: the client's packed activations (real tokens x width) up,
their gradient down. A codec encodes the activations; the message it makes is the *layout*
(``Layout.of``) the gradient comes back in: the same tokens, the same kept entries, each at the
precision its activations had. One decoder reads both, and every byte counted is the serialized
message's.

The codecs:

- ``Dense(dtype)``: every value, at fp32, fp16, bf16 or int8 (a scale per token);
- ``TopK(fraction, dtype)``: the ``fraction`` of each token's values largest in magnitude, as
  (index, value) pairs; the server answers for the kept entries only, the others get no gradient;
- ``Tiers(rung)``: a traffic budget's rung (``split.act_budget_mb``; ``Budget`` picks one per batch).

``for_config`` picks Dense or TopK from ``split.act_dtype`` and ``split.act_topk``.

**Tiers.** Each batch's activations are sent at the most precise rung of a fixed ladder whose
serialized message fits the batch's share of the round's budget: the bytes left in the round
divided by the batches left (what a batch saves is spent by the next ones). A rung gives the
tokens, ranked by the L2 norm of their activation (largest first), to tiers of falling precision:

    fp32 dense  >  fp16 dense  >  int8 dense (a scale per token)  >  int8 top-k  >  dropped

The rule "most precision to the largest-norm tokens" follows the observation that a few tokens
carry most of a transformer's activation mass and attention (the first/[CLS] token, delimiters:
Sun et al., 2024, "Massive activations in large language models"); the many low-norm tokens are
the ones compressed or, at the last rungs, not sent (the server sees zeros there). A batch that
fits no rung goes at the last one and is counted in ``act_over_budget_batches``.

Rung 0 (all fp32) is sent as ``Dense("fp32")``, so a generous budget is exactly the dense fp32
split. Every other rung uses the tiered format: ``act.tiers`` [tokens, width, n_fp32, n_fp16,
n_int8, n_sparse], ``act.order`` (the sent tokens, by falling norm) and one group of tensors per
non-empty tier, each tier a Dense or TopK encoding of its tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ... import compression
from ...wire import Message, serialize

ACT, GRAD = "act.", "grad."
DTYPE_NAMES = {**{v: k for k, v in compression.FLOAT_DTYPES.items()}, torch.int8: "int8"}


class Codec(Protocol):
    def encode(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """Packed activations (tokens, width) -> the message's tensors, named under ``prefix``."""


@dataclass(frozen=True)
class Dense:
    dtype: str = "fp32"

    def encode(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        return compression.quantize(x, self.dtype, prefix)


@dataclass(frozen=True)
class TopK:
    fraction: float
    dtype: str = "fp32"

    def encode(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        k = max(1, math.ceil(self.fraction * x.shape[-1]))
        return compression.topk_encode(x, k, self.dtype, prefix, magnitude=True)


def for_config(s) -> Codec:
    """The codec of ``split.act_dtype`` / ``split.act_topk`` (a SplitConfig)."""
    return TopK(s.act_topk, s.act_dtype) if s.act_topk else Dense(s.act_dtype)


# ---- layouts: where a message's values sit in the dense (tokens, width) tensor


@dataclass(frozen=True)
class Group:
    """The tokens that one set of a message's tensors (``values``, ``scale``) carries."""

    key: str  # the tensors' names after the message's prefix: "" or a tier's "f16."
    dtype: str  # the values' precision
    rows: torch.Tensor | None  # which tokens, in the values' order; None: all of them
    index: torch.Tensor | None  # top-k: the entries kept of each token; None: all of them


@dataclass(frozen=True)
class Layout:
    tokens: int
    width: int
    groups: tuple[Group, ...]

    @classmethod
    def of(cls, t: dict[str, torch.Tensor], prefix: str) -> Layout:
        """The layout of an activations message (any codec's)."""
        if f"{prefix}tiers" in t:
            return _tiered_layout(t, prefix)
        values, index = t[f"{prefix}values"], t.get(f"{prefix}index")
        width = values.shape[-1] if index is None else int(t[f"{prefix}width"][0])
        return cls(values.shape[0], width, (Group("", DTYPE_NAMES[values.dtype], None, index),))

    def encode(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """A dense (tokens, width) tensor, the activations' gradient, in this layout: each group's
        tokens at its precision, their kept entries only; nothing for tokens no group carries."""
        out = {}
        for g in self.groups:
            rows = x if g.rows is None else x[g.rows.to(x.device)]
            if g.index is not None:
                rows = rows.gather(-1, g.index.long().to(x.device))
            out.update(compression.quantize(rows, g.dtype, f"{prefix}{g.key}"))
        return out

    def decode(self, t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        """A message in this layout -> dense float32 (tokens, width), zeros where nothing was sent."""
        if len(self.groups) == 1 and self.groups[0].rows is None:
            return self._values(t, prefix, self.groups[0])
        out = torch.zeros(self.tokens, self.width)
        for g in self.groups:
            out[g.rows.to(out.device)] = self._values(t, prefix, g)
        return out

    def _values(self, t: dict[str, torch.Tensor], prefix: str, g: Group) -> torch.Tensor:
        values = compression.dequantize(t, f"{prefix}{g.key}")
        if g.index is None:
            return values
        out = torch.zeros(*g.index.shape[:-1], self.width, device=values.device)
        return out.scatter_(-1, g.index.long().to(values.device), values)


def decode(t: dict[str, torch.Tensor], prefix: str, layout: dict[str, torch.Tensor] | None = None,
           lprefix: str | None = None) -> torch.Tensor:
    """-> dense float32 (tokens, width). ``layout`` (and its prefix) is the activations' message
    when ``t`` is their gradient."""
    return Layout.of(t, prefix).decode(t, prefix) if layout is None else Layout.of(layout, lprefix).decode(t, prefix)


def encode_like(x: torch.Tensor, layout: dict[str, torch.Tensor], lprefix: str, prefix: str) -> dict[str, torch.Tensor]:
    """The gradient of activations that arrived as ``layout``, in their layout."""
    return Layout.of(layout, lprefix).encode(x, prefix)


# ---- the budget's tiers

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


@dataclass(frozen=True)
class Tiers:
    rung: int

    def encode(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        if self.rung == 0:
            return Dense("fp32").encode(x, prefix)
        tokens, width = x.shape
        n = counts(tokens, self.rung)
        order = x.detach().float().norm(dim=-1).argsort(descending=True, stable=True)[: sum(n)]
        out = {f"{prefix}tiers": torch.tensor([tokens, width, *n], dtype=torch.int32),
               f"{prefix}order": order.to(torch.int32)}
        start = 0
        for tier, count in zip(TIERS, n):
            if count:
                codec = TopK(RUNGS[self.rung][4], "int8") if tier == "sp" else Dense(DTYPES[tier])
                out.update(codec.encode(x[order[start:start + count]], f"{prefix}{tier}."))
            start += count
        return out


def _tiered_layout(t: dict[str, torch.Tensor], prefix: str) -> Layout:
    tokens, width, *n = t[f"{prefix}tiers"].tolist()
    order = t[f"{prefix}order"].long()
    groups, start = [], 0
    for tier, count in zip(TIERS, n):
        if count:
            index = t[f"{prefix}{tier}.index"] if tier == "sp" else None
            groups.append(Group(f"{tier}.", DTYPES[tier], order[start:start + count], index))
        start += count
    return Layout(tokens, width, tuple(groups))


def tally(record: dict[str, int], t: dict[str, torch.Tensor], prefix: str, tokens: int) -> None:
    """Add one batch's tokens per tier to ``record`` (the client record's chosen settings)."""
    n = t[f"{prefix}tiers"][2:].tolist() if f"{prefix}tiers" in t else [tokens, 0, 0, 0]
    for key, count in zip(RECORD, [*n, tokens - sum(n)]):
        record[key] = record.get(key, 0) + count


class Budget:
    """A client's activation uploads in one round under ``split.act_budget_mb``: each batch gets
    the bytes left divided by the batches left, and the most precise rung whose serialized
    message fits."""

    def __init__(self, total_bytes: float, batches: int):
        self.left, self.batches = total_bytes, batches
        self.tally: dict[str, int] = {}
        self.over = 0

    def message(self, sent: torch.Tensor, extra: dict, step: int) -> Message:
        share = self.left / max(self.batches, 1)
        for rung in range(len(RUNGS)):
            msg = Message({**Tiers(rung).encode(sent, ACT), **extra}, {"step": step})
            size = len(serialize(msg))
            if size <= share:
                break
        else:
            self.over += 1
        self.left -= size
        self.batches -= 1
        tally(self.tally, msg.tensors, ACT, sent.shape[0])
        return msg

    def record(self) -> dict:
        return {**self.tally, "act_over_budget_batches": self.over}
