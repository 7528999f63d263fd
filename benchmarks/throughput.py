"""Local-training throughput of each framework's client step against what a user would run on one
machine: (a) a plain PyTorch + PEFT loop over the same rows and model (the physical limit), (b)
Hugging Face ``Trainer`` (classification) and TRL's ``SFTTrainer`` (sft) with the same model,
LoRA, batch, precision and rows. Peak memory beside each; and zo's step time over the time of
two forward passes of the same batch.

    python benchmarks/throughput.py                 # SmolLM2 and MiniLM, fp32 and bf16
    python benchmarks/throughput.py --quick         # tiny models, a few steps: checks that it runs
    python benchmarks/throughput.py --models minilm --precisions bf16 --steps 20

Needs the bench extra (``pip install -e .[bench]``: trl). Every measurement runs in its own
process (its peak RSS, or on CUDA its peak allocated memory, is its own). samples/s is the
steady state: the rows of every step after the first over the time from the end of the first
step to the end of the last; for fedtune's frameworks "round samples/s" also counts the client's
whole round (decoding, state swap, encoding). Output is Markdown; paste it into throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FRAMEWORK_RUNNERS = ("fedavg", "kd", "split", "zo")
CAUSAL = ("smollm2", "tiny-llama")  # models that also run the sft task (TRL's SFTTrainer)
QUICK_MODELS = {"smollm2": "tiny-llama", "minilm": "tiny-bert"}
SFT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


# --------------------------------------------------------------------------- one measurement


class Steps:
    """Time stamps at the end of each step: steady-state samples/s after the first step."""

    def __init__(self, batch: int):
        self.batch, self.stamps = batch, []

    def __call__(self, *_):
        self.stamps.append(time.perf_counter())

    def rate(self) -> float:
        if len(self.stamps) < 2:
            return float("nan")
        return self.batch * (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def config(job: dict):
    from fedtune import config as configlib

    rows = job["batch"] * job["steps"]
    keys = {"model.name": job["model"], "train.precision": job["precision"], "train.batch_size": job["batch"],
            "train.eval_batch_size": job["batch"], "fed.clients": 1, "fed.rounds": 1, "data.private_size": rows,
            "data.public_size": 2 * job["batch"], "data.test_size": job["batch"], "zo.steps": job["steps"],
            "kd.public_per_round": 0, "kd.client_eval_size": job["batch"], "model.lora_dropout": 0.0,
            "out": job["out"]}
    if job["threads"]:
        keys["train.threads"] = job["threads"]
    if job["task"] == "sft":
        keys.update({"train.task": "sft", "data.path": str(SFT_DATA), "data.max_length": job["max_length"],
                     "data.public_size": 0, "data.test_size": job["batch"], "eval.metric": "none"})
    cfg = configlib.build_config("demo", None, keys)
    from fedtune import precision

    precision.resolve(cfg)
    return cfg


def run_framework(job: dict, ctx, steps: Steps) -> dict:
    from fedtune.frameworks import get
    from fedtune.runtimes.rounds import MeteredLink, run_client
    from fedtune.wire import deserialize, serialize

    fw = get(job["runner"])(ctx)
    ctx.on_step = steps
    link = MeteredLink(lambda blob: serialize(fw.serve(1, 0, deserialize(blob)))) if fw.per_batch else None
    start = time.perf_counter()
    reply = run_client(fw, 1, 0, serialize(fw.configure(1, 0)), None, link)
    seconds = time.perf_counter() - start
    out = {"round_samples_per_s": reply.record["num_samples"] / seconds}
    if job["runner"] == "zo":
        out["zo_step_over_two_forwards"] = zo_ratio(ctx, steps)
    return out


def zo_ratio(ctx, steps: Steps) -> float:
    """A zo step's median time over the median time of two forward passes (the loss) of one batch."""
    import statistics

    import torch

    gaps = [b - a for a, b in zip(steps.stamps, steps.stamps[1:])]
    batch = ctx.client_batches(1, 0)[0].to(ctx.device)
    ctx.model.eval()
    times = []
    with torch.no_grad():
        for _ in range(max(3, len(gaps))):
            start = time.perf_counter()
            ctx.task.loss(ctx.model, batch)
            ctx.task.loss(ctx.model, batch)
            times.append(time.perf_counter() - start)
    return statistics.median(gaps) / statistics.median(times[1:])


def run_plain(job: dict, ctx, steps: Steps) -> dict:
    """The same rows and model, a bare loop: forward, loss, backward, AdamW step."""
    import torch

    model = ctx.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for batch in ctx.client_batches(1, 0):
        batch = batch.to(ctx.device)
        optimizer.zero_grad(set_to_none=True)
        ctx.task.loss(model, batch).backward()
        optimizer.step()
        steps()
    return {}


def trainer_args(job: dict, ctx, **extra):
    from transformers import TrainingArguments

    kw = dict(output_dir=job["out"] + "-trainer", per_device_train_batch_size=job["batch"], max_steps=job["steps"],
              learning_rate=1e-4, bf16=job["precision"] == "bf16", use_cpu=ctx.device.type == "cpu",
              report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
              dataloader_num_workers=0, remove_unused_columns=False, seed=0,
              train_sampling_strategy="sequential")  # rows_in_batch_order: fedtune's very batches
    if extra.pop("sft", False):
        from trl import SFTConfig

        return SFTConfig(**kw, max_length=job["max_length"], packing=False, completion_only_loss=True,
                         dataset_num_proc=None, **extra)
    return TrainingArguments(**kw, **extra)


class StepCallback:
    """A transformers TrainerCallback that stamps the end of each optimizer step."""

    def __new__(cls, steps: Steps):
        from transformers import TrainerCallback

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                steps()

        return Stamp()


def rows_in_batch_order(ctx) -> list[tuple[list[int], object]]:
    """The client's rows unpadded, as (token ids, label), in the order of fedtune's batches: a
    trainer reading them in order pads the very batches fedtune trains on, so no runner gains
    or loses by which rows share a batch (dynamic padding pads to the batch's longest row)."""
    rows = []
    for batch in ctx.client_batches(1, 0):
        for ids, mask, label in zip(batch.input_ids, batch.attention_mask, batch.labels):
            keep = mask.bool()
            rows.append((ids[keep].tolist(), label[keep].tolist() if label.dim() else int(label)))
    return rows


def run_hf_trainer(job: dict, ctx, steps: Steps) -> dict:
    """transformers' Trainer on the client's rows (classification), the same PEFT model."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    rows = [{"input_ids": ids, "labels": y} for ids, y in rows_in_batch_order(ctx)]
    trainer = Trainer(model=ctx.model, args=trainer_args(job, ctx), train_dataset=Dataset.from_list(rows),
                      data_collator=DataCollatorWithPadding(ctx.tokenizer), callbacks=[StepCallback(steps)])
    trainer.train()
    return {}


def run_trl_sft(job: dict, ctx, steps: Steps) -> dict:
    """TRL's SFTTrainer with the same PEFT model on the very token ids fedtune trains on (prompt
    and response after fedtune's chat template and truncation), the loss on the response only."""
    from datasets import Dataset
    from trl import SFTTrainer

    data = Dataset.from_list([{"input_ids": ids, "completion_mask": [int(t != -100) for t in labels]}
                              for ids, labels in rows_in_batch_order(ctx)])
    trainer = SFTTrainer(model=ctx.model, args=trainer_args(job, ctx, sft=True), train_dataset=data,
                         processing_class=ctx.tokenizer, callbacks=[StepCallback(steps)])
    trainer.train()
    return {}


RUNNERS = {"plain": run_plain, "hf-trainer": run_hf_trainer, "trl-sft": run_trl_sft}


def measure(job: dict) -> dict:
    import torch

    from fedtune.frameworks.base import Context

    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "out": str(Path(tmp) / "run")}
        ctx = Context.build(config(job))
        steps = Steps(job["batch"])
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if job["runner"] in FRAMEWORK_RUNNERS:
            out = run_framework(job, ctx, steps)
        else:
            out = RUNNERS[job["runner"]](job, ctx, steps)
    peak = (torch.cuda.max_memory_allocated() if ctx.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**job, **out, "samples_per_s": steps.rate(), "peak_mb": peak / 2**20,
            "device": ctx.device.type, "attn": ctx.cfg.model.attn_implementation}


# --------------------------------------------------------------------------- the table


def jobs(args) -> list[dict]:
    out = []
    tasks = set(args.tasks)
    for name in args.models:
        model = QUICK_MODELS.get(name, name) if args.quick else name
        for prec in args.precisions:
            base = dict(model=model, precision=prec, batch=args.batch, steps=args.steps, threads=args.threads,
                        max_length=args.max_length)
            if "classify" in tasks:
                for runner in (*FRAMEWORK_RUNNERS, "plain", "hf-trainer"):
                    out.append({**base, "task": "classify", "runner": runner})
            if model in CAUSAL and "sft" in tasks:
                for runner in ("fedavg", "plain", "trl-sft"):
                    out.append({**base, "task": "sft", "runner": runner})
    return out


def child(job: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {**job, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge(repeats: list[dict]) -> dict:
    """One job's repeated measurements -> their medians (peak memory: the largest), with the
    samples/s spread; a repeat that failed fails the job."""
    import statistics

    failed = [r for r in repeats if "error" in r]
    if failed:
        return failed[0]
    out = dict(repeats[0])
    for key in ("samples_per_s", "round_samples_per_s", "zo_step_over_two_forwards"):
        if key in out:
            out[key] = statistics.median(r[key] for r in repeats)
    out["peak_mb"] = max(r["peak_mb"] for r in repeats)
    rates = [r["samples_per_s"] for r in repeats]
    out["spread"] = f"{min(rates):.1f}-{max(rates):.1f}" if len(rates) > 1 else ""
    return out


def measure_all(todo: list[dict], repeats: int) -> list[dict]:
    """Every job once, then every job again, ``repeats`` times: a slow spell of the machine
    falls on every runner alike rather than on one."""
    runs = [[child(job) for job in todo] for _ in range(repeats)]
    return [merge([run[i] for run in runs]) for i in range(len(todo))]


def table(results: list[dict]) -> str:
    lines = ["| model | task | precision | runner | samples/s | min-max | vs plain | vs Trainer/SFTTrainer | "
             "round samples/s | peak MB | zo step / 2 fwd |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        group = [x for x in results if (x["model"], x["task"], x["precision"]) == (r["model"], r["task"], r["precision"])]
        ref = {x["runner"]: x.get("samples_per_s") for x in group}
        trainer = ref.get("hf-trainer") or ref.get("trl-sft")
        if "error" in r:
            lines.append(f"| {r['model']} | {r['task']} | {r['precision']} | {r['runner']} | error: {r['error']} "
                         "| | | | | | |")
            continue
        sps = r["samples_per_s"]
        lines.append(f"| {r['model']} | {r['task']} | {r['precision']} | {r['runner']} | {sps:.1f} | "
                     f"{r.get('spread', '')} | "
                     f"{_ratio(sps, ref.get('plain'))} | {_ratio(sps, trainer)} | "
                     f"{_num(r.get('round_samples_per_s'))} | {r['peak_mb']:.0f} | "
                     f"{_num(r.get('zo_step_over_two_forwards'), 2)} |")
    return "\n".join(lines) + "\n" + bf16_ratios(results)


def bf16_ratios(results: list[dict]) -> str:
    """bf16 / fp32 samples/s per (model, task, runner)."""
    lines = []
    for r in results:
        if r.get("precision") != "bf16" or "error" in r:
            continue
        twin = next((x for x in results if x.get("precision") == "fp32" and "error" not in x and
                     (x["model"], x["task"], x["runner"]) == (r["model"], r["task"], r["runner"])), None)
        if twin:
            lines.append(f"| {r['model']} | {r['task']} | {r['runner']} | {_ratio(r['samples_per_s'], twin['samples_per_s'])} |")
    if not lines:
        return ""
    return "\n| model | task | runner | bf16 / fp32 samples/s |\n|---|---|---|---:|\n" + "\n".join(lines) + "\n"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b and a == a and b == b else ""


def _num(x, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and few steps: checks that everything runs")
    p.add_argument("--models", type=lambda s: s.split(","), default=["smollm2", "minilm"])
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="training steps per measurement (the first is warm-up)")
    p.add_argument("--max-length", type=int, default=128, help="sft: tokens per row")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["classify", "sft"])
    p.add_argument("--repeats", type=int, default=1, help="measure every job this many times, interleaved; "
                   "the table gives medians and the samples/s range")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one measurement, JSON out
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    if args.quick:
        args.batch, args.steps, args.max_length = min(args.batch, 4), min(args.steps, 3), min(args.max_length, 48)
    results = measure_all(jobs(args), max(args.repeats, 1))
    import torch

    print(f"## Throughput: batch {args.batch}, {args.steps} steps, {args.repeats} repeat(s), torch "
          f"{torch.__version__}, {torch.get_num_threads() if not args.threads else args.threads} threads\n")
    print(table(results))


if __name__ == "__main__":
    main()
