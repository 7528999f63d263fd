"""Lossy encodings for what frameworks send: lower-precision floats, int8 with a per-row
scale, and top-k sparsification. Each encoder returns named tensors for a Message, so the
bytes metered are the bytes of the encoded form; each decoder rebuilds a dense float32 tensor.

Shared by KD (logits; frameworks/kd/codecs.py decodes top-k probabilities into distributions)
and split learning (activations and their gradients)."""

from __future__ import annotations

import torch

from .errors import FedtuneError

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def quantize(x: torch.Tensor, dtype: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Encode ``x`` in ``dtype``: fp32/fp16/bf16 cast, or int8 with a scale per last-dim row
    (symmetric: q = round(x / s), s = max|row| / 127; the error is at most s / 2 per value)."""
    if dtype in FLOAT_DTYPES:
        return {f"{prefix}values": x.to(FLOAT_DTYPES[dtype])}
    if dtype == "int8":
        scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)
        return {f"{prefix}values": q, f"{prefix}scale": scale.to(torch.float32)}
    raise FedtuneError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16, int8")


def dequantize(t: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    values = t[f"{prefix}values"]
    if values.dtype == torch.int8:
        return values.float() * t[f"{prefix}scale"]
    return values.float()


def topk_encode(
    x: torch.Tensor, k: int, dtype: str = "fp32", prefix: str = "", magnitude: bool = False
) -> dict[str, torch.Tensor]:
    """Keep the k largest entries of each last-dim row as (index, value) pairs; with
    ``magnitude`` the k largest in absolute value (activations, where sign carries no rank)."""
    k = min(k, x.shape[-1])
    if magnitude:
        index = torch.topk(x.abs(), k, dim=-1).indices
        values = x.gather(-1, index)
    else:
        values, index = torch.topk(x, k, dim=-1)
    idx_dtype = torch.int16 if x.shape[-1] <= 32767 else torch.int32
    out = quantize(values, dtype, prefix)
    out[f"{prefix}index"] = index.to(idx_dtype)
    out[f"{prefix}width"] = torch.tensor([x.shape[-1]], dtype=torch.int32)
    return out


def topk_indices_values(t: dict[str, torch.Tensor], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor, int]:
    return t[f"{prefix}index"].long(), dequantize(t, prefix), int(t[f"{prefix}width"][0])


def topk_decode_dense(t: dict[str, torch.Tensor], fill: float = 0.0, prefix: str = "") -> torch.Tensor:
    """Scatter the kept values back; every other entry is ``fill``."""
    index, values, width = topk_indices_values(t, prefix)
    out = torch.full((*index.shape[:-1], width), fill, dtype=torch.float32)
    return out.scatter_(-1, index, values)
