"""The wire format: what one party sends another (``Message``) and its bytes (``serialize``).

Every byte fedtune reports is ``len(serialize(msg))`` of a message that was actually sent:
the in-process runtime serializes and decodes every message, the Flower runtimes carry the
same blob."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import FedtuneError


@dataclass
class Message:
    """What one party sends another: named tensors plus small JSON metadata."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def serialize(msg: Message) -> bytes:
    """The wire format: safetensors (a JSON header + raw little-endian tensor bytes)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in msg.tensors.items()}
    return st_save(tensors, metadata={"meta": json.dumps(msg.meta)})


def deserialize(blob: bytes) -> Message:
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
    except Exception as exc:
        raise FedtuneError(f"malformed message: {exc}") from None
    meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    return Message(tensors, meta)


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data alone (no header): a lower bound a test checks against."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
