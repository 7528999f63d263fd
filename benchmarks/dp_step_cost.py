"""What a DP-SGD step costs against a plain step of the same (expected) batch: one optimizer step
on the same batch of B private rows, measured side by side in one process, for the per-example
paths ``privacy.per_example = vmap`` (torch.func, one batched pass) and ``loop`` (one backward
pass per example), on MiniLM and SmolLM2 with LoRA.

    python benchmarks/dp_step_cost.py > benchmarks/dp_step_cost.md     # MiniLM and SmolLM2
    python benchmarks/dp_step_cost.py --device cuda                    # on a GPU
    python benchmarks/dp_step_cost.py --quick                          # tiny model, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedtune import config as configlib  # noqa: E402
from fedtune import training  # noqa: E402
from fedtune.frameworks.base import Context  # noqa: E402
from fedtune.privacy import dp_sgd  # noqa: E402


def context(model: str, batch: int, device: str) -> Context:
    cfg = configlib.build_config("demo", None, {
        "model.name": model, "data.private_size": 4 * batch, "data.test_size": 8, "data.public_size": 8,
        "data.max_labels": 10, "fed.clients": 1, "train.batch_size": batch, "train.device": device,
        "privacy.dp_sgd": True, "privacy.sampler": "shuffle", "train.threads": 0})
    return Context.build(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_seconds(ctx: Context, how: str, repeats: int) -> float:
    """Median seconds of one optimizer step on the client's first batch: ``plain``, or DP-SGD by ``how``."""
    batch = ctx.client_batches(1, 0)[0]
    cfg = ctx.cfg
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        sync(ctx.device)
        start = time.perf_counter()
        if how == "plain":
            training.train_pass(ctx.model, [batch], cfg.train, ctx.device, ctx.flops, ctx.task.loss)
        else:
            dp = dp_sgd.ClientDP(cfg, len(ctx.client_rows(0)))
            dp.per_example = how
            dp_sgd.train_pass(ctx.model, [batch], cfg.train, ctx.device, ctx.flops, ctx.task.loss, dp)
            assert dp.per_example == how, f"vmap fell back to the loop on {cfg.model.name}"
        sync(ctx.device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny-gpt2, batch 8, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch, args.repeats = ["tiny-gpt2"], 8, 2
    print(f"# DP-SGD step cost\n\n`python benchmarks/dp_step_cost.py {'--quick ' if args.quick else ''}"
          f"--batch {args.batch} --repeats {args.repeats} --device {args.device}`: one optimizer step on the same "
          f"batch of {args.batch} rows, median of {args.repeats} after a warm-up, LoRA r=8, "
          f"{torch.get_num_threads()} threads.\n")
    print("| model | plain step (s) | DP-SGD vmap (s) | ratio | DP-SGD loop (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        ctx = context(name, args.batch, args.device)
        plain, vmap, loop = (step_seconds(ctx, how, args.repeats) for how in ("plain", "vmap", "loop"))
        print(f"| {name} | {plain:.3f} | {vmap:.3f} | {vmap / plain:.2f}x | {loop:.3f} | {loop / plain:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
