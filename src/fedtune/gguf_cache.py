"""A GGUF model converted once to safetensors and kept in fedtune's cache, with a record beside it
of what made it: the GGUF file, the transformers version that read it and fedtune's conversion
format. A conversion is reused only while all three are the same; otherwise it is made again.
The record also carries the sha256 of the converted weights, which a run's environment.json names."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

# Raise when the conversion's output changes (how the weights are cast or saved): caches made by
# an older format are then rebuilt.
CONVERSION_FORMAT = 1
RECORD = "fedtune-conversion.json"
MB = 1 << 20


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ""


@lru_cache(maxsize=16)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    # The first and last MB with the size: enough to tell two GGUF files apart without reading
    # hundreds of MB at every model lookup.
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(MB))
        f.seek(max(0, size - MB))
        h.update(f.read(MB))
    return h.hexdigest()


def key(gguf: Path) -> dict[str, Any]:
    """What a conversion of ``gguf`` depends on."""
    st = gguf.stat()
    return {"gguf": gguf.name, "gguf_size": st.st_size, "gguf_sha256_ends": _fingerprint(str(gguf), st.st_size, st.st_mtime_ns),
            "transformers": _version("transformers"), "format": CONVERSION_FORMAT}


def read_record(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(model_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def is_current(model_dir: Path, gguf: Path) -> bool:
    """True when ``model_dir`` holds a complete conversion made from ``gguf`` by this code."""
    record = read_record(model_dir)
    return (model_dir / "config.json").is_file() and record is not None and record.get("key") == key(gguf)


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the safetensors files of ``model_dir``, in name order."""
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(8 * MB):
                h.update(chunk)
    return h.hexdigest()


def write_record(model_dir: Path, gguf: Path) -> None:
    record = {"key": key(gguf), "weights_sha256": weights_sha256(model_dir)}
    (Path(model_dir) / RECORD).write_text(json.dumps(record, indent=2))


def install(tmp: Path, dest: Path, gguf: Path) -> None:
    """Put the finished conversion in ``tmp`` at ``dest``, with its record. One that another
    process finished first is kept; a stale one is replaced."""
    write_record(tmp, gguf)
    stale = dest.with_name(dest.name + f".stale{os.getpid()}")
    try:
        if is_current(dest, gguf):
            shutil.rmtree(tmp)
            return
        if dest.exists():
            dest.rename(stale)
        tmp.rename(dest)
    except OSError:  # another process moved its own conversion in meanwhile
        if not is_current(dest, gguf):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)


def converted(gguf: Path, dest: Path, what: str, quiet: Callable[[], None]) -> Path:
    """``dest``: the model of ``gguf`` as safetensors, converted once through transformers (~20 s
    saved per load) and again only when what made it changed. ``quiet`` silences transformers."""
    if is_current(dest, gguf):
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One line says what happens; transformers' conversion, loading and writing bars would
    # otherwise fill the screen (the GGUF bar is plain tqdm, so only redirecting stderr stops it).
    again = " (replacing one made from another file or by another version)" if dest.exists() else ""
    print(f"fedtune: preparing {what} once (~20 s), cached in {dest}{again}", file=sys.stderr, flush=True)
    quiet()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model it thinks is still quantized; the weights are plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    install(tmp, dest, gguf)
    return dest
