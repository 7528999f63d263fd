"""What kd sends for a block of outputs (rows x width logits, both ways): one ``Codec`` per
encoding, chosen from the config through ``CODECS``.

- ``dense``: every logit, in ``kd.logit_dtype`` (fp32, fp16, or int8 with a scale per row);
- ``topk`` (``kd.logit_topk = k``): the k largest probabilities at temperature T as (index,
  value) pairs; the receiver handles the mass not sent as ``kd.topk_tail`` says (``TAILS``);
- ``lowrank`` (``kd.logit_rank = k``): a rank-k SVD code of the row-centred logits.

``encode`` turns logits into a payload of named tensors, which travels as a Message, so the
bytes metered are those of the serialized payload (``Codec.nbytes``); ``decode`` checks a
payload and turns it into probabilities at T, raising FedtuneError with the reason when it is
malformed (wrong names or shape, NaN, inf, indices out of range)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...compression import dequantize, quantize, topk_encode, topk_indices_values
from ...config import KDConfig
from ...errors import FedtuneError
from ...wire import Message, serialize

# --------------------------------------------------------------------------- top-k tails


def topk_decode_distribution(t: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Top-k *probabilities* -> a full distribution: the kept entries are exact and the
    remaining mass 1 - sum(kept) is spread evenly over the width - k others (an invented tail)."""
    index, probs, width = topk_indices_values(t, prefix)
    k = index.shape[-1]
    rest = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0) / max(width - k, 1)
    out = rest.expand(*index.shape[:-1], width).clone()
    return out.scatter_(-1, index, probs)


def topk_decode_buckets(t: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Top-k *probabilities* -> (..., width + 1): the kept entries at their indices, 0 on the
    others, and the remaining mass 1 - sum(kept) in one extra last column, the "rest" bucket.
    Exactly what was sent, with no claim about how the rest is shared out (losses.kd_loss)."""
    index, probs, width = topk_indices_values(t, prefix)
    out = torch.zeros(*index.shape[:-1], width + 1, dtype=torch.float32)
    out.scatter_(-1, index, probs)
    out[..., width] = (1.0 - probs.sum(-1)).clamp_min(0.0)
    return out


TAILS = {"bucket": topk_decode_buckets, "uniform": topk_decode_distribution}


def class_space(buckets: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """A top-k upload in buckets (..., width + 1) -> a distribution over the width classes
    (``kd.topk_merge = "class"``): the rest bucket is spread over the classes this sender did not
    send, in proportion to ``prior`` (the server's own distribution on the row; uniform when None).
    Averaging these is averaging in class space: a class one client sent keeps the other clients'
    share of it, where a bucket-by-bucket mean would count that share as mass on classes nobody
    sent (docs/kd.md)."""
    kept, rest = buckets[..., :-1].double(), buckets[..., -1:].double()
    unsent = (kept == 0).double()
    weight = unsent * (prior.double() if prior is not None else 1.0)
    # a prior with no mass on the unsent classes says nothing about them: uniform over them then
    total = weight.sum(-1, keepdim=True)
    weight = torch.where(total > 0, weight / total.clamp_min(1e-300), unsent / unsent.sum(-1, keepdim=True).clamp_min(1))
    return (kept + rest * weight).float()

# --------------------------------------------------------------------------- low-rank logits


def lowrank_encode(logits: torch.Tensor, k: int, dtype: str) -> dict[str, torch.Tensor]:
    """Rank-k code of ``logits`` (rows x width): each row is centred first (softmax ignores a row's
    shift, so the rank spent on it is saved), then X_c ~ (U_k S_k) V_k^T. Sent: the coefficients
    U_k S_k (rows x k) and the sender's own basis V_k^T (k x width), each in ``dtype``."""
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


# --------------------------------------------------------------------------- the codecs


def _require(t: dict[str, torch.Tensor], need: list[str]) -> None:
    missing = [k for k in need if k not in t]
    if missing:
        raise FedtuneError(f"payload lacks {', '.join(missing)}")


def _checked_values(t: dict[str, torch.Tensor], need: list[str], rows: int, cols: int) -> torch.Tensor:
    """The payload's values (rows x cols, dequantized), after checking names, shapes and finiteness."""
    _require(t, need)
    for key in ("values", "index"):
        if key in t and tuple(t[key].shape) != (rows, cols):
            raise FedtuneError(f"{key} has shape {tuple(t[key].shape)}, expected {(rows, cols)}")
    if "scale" in t and tuple(t["scale"].shape) != (rows, 1):
        raise FedtuneError(f"scale has shape {tuple(t['scale'].shape)}, expected {(rows, 1)}")
    values = dequantize(t)
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).any(-1).sum())
        raise FedtuneError(f"values hold NaN or inf in {bad} rows")
    return values


class Codec:
    """One encoding of kd's outputs: ``encode`` logits -> payload, ``decode`` payload ->
    probabilities at temperature T, (rows, width) (top-k under the bucket tail: width + 1)."""

    def __init__(self, cfg: KDConfig):
        self.cfg = cfg

    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, t: dict[str, torch.Tensor], rows: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def error(self, logits: torch.Tensor, t: dict[str, torch.Tensor]) -> float | None:
        """The code's relative error on ``logits``, for codes whose error is worth recording."""
        return None

    @staticmethod
    def nbytes(t: dict[str, torch.Tensor]) -> int:
        """What the payload costs on the wire: its serialized length, as the runtimes meter it."""
        return len(serialize(Message(t)))

    def scale_names(self) -> list[str]:
        """int8 values carry a scale per row."""
        return ["scale"] if self.cfg.logit_dtype == "int8" else []


class DenseCodec(Codec):
    def encode(self, logits):
        return quantize(logits.float(), self.cfg.logit_dtype)

    def decode(self, t, rows, width):
        values = _checked_values(t, ["values"] + self.scale_names(), rows, width)
        return F.softmax(values / self.cfg.temperature, dim=-1)


class TopKCodec(Codec):
    def encode(self, logits):
        cfg = self.cfg
        return topk_encode(F.softmax(logits.float() / cfg.temperature, dim=-1), cfg.logit_topk, cfg.logit_dtype)

    def decode(self, t, rows, width):
        need = ["values", "index", "width"] + self.scale_names()
        values = _checked_values(t, need, rows, min(self.cfg.logit_topk, width))
        if int(t["width"][0]) != width or int(t["index"].min()) < 0 or int(t["index"].max()) >= width:
            raise FedtuneError(f"top-k indices or width do not fit {width} outputs")
        if (values < 0).any() or (values.sum(-1) > 1.05).any():
            raise FedtuneError("top-k values are not probabilities")
        probs = TAILS[self.cfg.topk_tail](t)
        return probs / probs.sum(-1, keepdim=True)  # int8 rounding can leave the sum slightly off 1


class LowRankCodec(Codec):
    def encode(self, logits):
        return lowrank_encode(logits, self.cfg.logit_rank, self.cfg.logit_dtype)

    def decode(self, t, rows, width):
        cfg = self.cfg
        _require(t, [f"{p}{k}" for p in ("coef_", "basis_") for k in ["values"] + self.scale_names()])
        k = t["coef_values"].shape[-1] if t["coef_values"].dim() == 2 else -1
        if not 1 <= k <= min(cfg.logit_rank, rows, width) or tuple(t["coef_values"].shape) != (rows, k) \
                or tuple(t["basis_values"].shape) != (k, width):
            raise FedtuneError(f"low-rank code has shapes {tuple(t['coef_values'].shape)} and "
                               f"{tuple(t['basis_values'].shape)}, expected ({rows}, k) and (k, {width}) with "
                               f"k <= {min(cfg.logit_rank, rows, width)}")
        logits = lowrank_decode(t)
        if not torch.isfinite(logits).all():
            raise FedtuneError(f"values hold NaN or inf in {int((~torch.isfinite(logits)).any(-1).sum())} rows")
        return F.softmax(logits / cfg.temperature, dim=-1)

    def error(self, logits, t):
        return lowrank_error(logits, t)


CODECS: dict[str, type[Codec]] = {"dense": DenseCodec, "topk": TopKCodec, "lowrank": LowRankCodec}


def codec_name(cfg: KDConfig) -> str:
    """Which codec the config asks for (config validation keeps logit_rank and logit_topk apart)."""
    return "lowrank" if cfg.logit_rank else "topk" if cfg.logit_topk else "dense"


def make_codec(cfg: KDConfig) -> Codec:
    return CODECS[codec_name(cfg)](cfg)


def encode_outputs(logits: torch.Tensor, cfg: KDConfig) -> dict[str, torch.Tensor]:
    return make_codec(cfg).encode(logits)


def decode_outputs(t: dict[str, torch.Tensor], cfg: KDConfig, rows: int, width: int) -> torch.Tensor:
    return make_codec(cfg).decode(t, rows, width)
