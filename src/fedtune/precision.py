"""train.precision: the dtype the frozen base is stored and computed in.

``bf16`` stores the frozen base weights in bf16 (half the memory; the matmuls run on the CPU's
AMX / AVX-512 BF16 units or a GPU's tensor cores) and keeps every tunable parameter (LoRA, DoRA,
IA3, prompt, prefix, the head, modules_to_save), its gradient and the optimizer state in fp32.
Forward passes run under bf16 autocast so that fp32 tunable weights meet bf16 activations;
what leaves a client (tunable state, logits, activations) is fp32 unless a codec says otherwise.
``auto`` is bf16 where the hardware computes it natively, else fp32; ``resolve`` writes the choice
into the config so config.toml never says auto.
"""

from __future__ import annotations

from functools import lru_cache, wraps
from typing import Any

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str) -> bool:
    """True where bf16 matmuls run on dedicated units: a CUDA GPU that supports bf16, or a CPU
    with AMX or AVX-512 BF16 that torch's kernels can use (its AVX-512 code path at least)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    return bool(cpu_flags() & set(CPU_BF16_FLAGS)) and capability.startswith("AVX512")


def device_type(train_device: str) -> str:
    if train_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(train_device).type


def resolve(cfg: Any) -> None:
    """``train.precision=auto`` -> fp32 or bf16, ``model.attn_implementation=auto`` -> sdpa, or
    eager under bf16 on a CPU (torch's CPU flash-attention kernel in bf16 is slower than eager
    attention's matmuls on the bf16 units). Idempotent; writes into ``cfg``."""
    kind = device_type(cfg.train.device)
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16" if native_bf16(kind) else "fp32"
    if cfg.model.attn_implementation == "auto":
        cfg.model.attn_implementation = "eager" if cfg.train.precision == "bf16" and kind == "cpu" else "sdpa"


def dtype_of(precision: str) -> torch.dtype:
    """The frozen base's dtype (``auto`` not yet resolved counts as fp32)."""
    return DTYPES.get(precision, torch.float32)


def tunable_to_fp32(model: nn.Module) -> nn.Module:
    """Every trainable parameter in fp32 (the optimizer then keeps its state in fp32 too)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast of forward passes under train.precision=bf16 (off otherwise)."""
    kind = device if isinstance(device, str) else device.type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


def autocast_forwards(model: nn.Module, device: torch.device | str) -> None:
    """Every entry point a caller runs the model through (the PEFT wrapper, the Hugging Face
    model, its body, its output head, the trained heads) computes under bf16 autocast, so fp32
    tunable weights and bf16 activations meet wherever a framework or task calls in."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entries = [model, base, getattr(base, "base_model", None), base.get_output_embeddings()]
    entries += [m for name, m in model.named_modules() if name.endswith("modules_to_save")]
    seen: set[int] = set()
    for module in entries:
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        module.forward = _autocast_forward(module.forward, device)


def _autocast_forward(forward, device):
    # wraps: peft and transformers read the forward's signature (prefix tuning's past_key_values).
    @wraps(forward)
    def run(*args, **kwargs):
        with autocast("bf16", device):
            return forward(*args, **kwargs)

    return run


def compile_body(model: nn.Module) -> None:
    """train.compile: torch.compile the transformer body in place (every task and the classify
    head run through it; the names of the tunable parameters do not change). The one shared
    model is compiled once and reused by every client and round. Dynamic padding gives batches
    of new lengths: torch recompiles at the second length it meets and then marks that
    dimension dynamic, so a run pays one or two compiles, not one per length (data.padding=
    max_length gives a single shape). Split learning's parts call the blocks directly and run
    eagerly."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "base_model", None) or base
    body.compile()
