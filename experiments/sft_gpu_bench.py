"""Training throughput and peak GPU memory of one SFT client step loop on SmolLM2 (CUDA):
fp32 against bf16 autocast, gradient checkpointing, and a 4-bit (QLoRA) base.
    python experiments/sft_gpu_bench.py experiments/sft.toml RESULT.json [--set key=value ...]"""

import json
import sys
import time

import torch

from fedtune import config as configlib
from fedtune.frameworks.base import Context
from fedtune.training import train_pass

path, result, *rest = sys.argv[1:]
base = configlib.parse_overrides([a for a in rest if a != "--set"])
VARIANTS = {
    "fp32": {},
    "bf16": {"train.bf16": "true"},
    "bf16+checkpointing": {"train.bf16": "true", "train.gradient_checkpointing": "true"},
    "4bit+bf16": {"train.bf16": "true", "model.quantize": "4bit"},
}
rows = []
for name, extra in VARIANTS.items():
    ctx = None
    try:
        cfg = configlib.build_config("demo", path, {**base, **extra, "train.device": "cuda"})
        ctx = Context.build(cfg)
        batches = ctx.client_batches(1, 0, limit=16 * 12)
        train_pass(ctx.model, batches[:2], cfg.train, ctx.device, ctx.flops, ctx.task.loss)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss, _ = train_pass(ctx.model, batches[2:], cfg.train, ctx.device, ctx.flops, ctx.task.loss)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        samples = sum(len(b.index) for b in batches[2:])
        rows.append({"variant": name, "samples_per_s": samples / seconds, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
                     "loss": loss, "samples": samples, "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length})
    except Exception as exc:  # report what could not run (e.g. bitsandbytes missing) and go on
        rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    print(json.dumps(rows[-1]), flush=True)
    del ctx
    torch.cuda.empty_cache()
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, open(result, "w"), indent=1)
