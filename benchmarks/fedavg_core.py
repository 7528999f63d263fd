"""Core FedAvg benchmarks, each a ratio measured in one run on one machine:

1. one FedAvg round over 3 clients (serialize, swap state, train, serialize, aggregate) vs
   centralized LoRA training on the same samples with the same batches   (target <= 1.10)
2. peak RSS of a run with 30 simulated clients vs one with 3            (target <= 1.25)
3. training throughput with dynamic padding vs fixed padding to 80

    python benchmarks/fedavg_core.py [--model minilm] [--repeats 3] [--out benchmarks/fedavg_core.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedtune import config as configlib
from fedtune.frameworks import get
from fedtune.frameworks.base import Context
from fedtune.wire import serialize
from fedtune.runtimes.rounds import MeteredLink, run_client
from fedtune.training import make_optimizer, train_pass


def round_vs_centralized(model: str, per_client: int, repeats: int) -> dict:
    cfg = configlib.build_config(overrides={
        "model.name": model, "data.private_size": 3 * per_client, "data.public_size": 0, "data.test_size": 64,
    })
    ctx = Context.build(cfg)
    fw = get("fedavg")(ctx)
    initial = dict(fw.global_state)
    fed_times, central_times = [], []
    for rep in range(repeats):
        # Federated: exactly what the in-process runtime does for a round, minus the evaluation.
        fw.global_state = dict(initial)
        start = time.perf_counter()
        uploads = {}
        for cid in range(3):
            down = serialize(fw.configure(1, cid))
            reply = run_client(fw, 1, cid, down, None, MeteredLink(lambda b: b))
            up, record = reply.blob, reply.record
            uploads[cid] = (up, record)
        from fedtune.wire import deserialize

        fw.aggregate(1, {c: (deserialize(b), r) for c, (b, r) in uploads.items()})
        fed_times.append(time.perf_counter() - start)
        # Centralized: one model, one optimizer, the very same batches in the same order.
        from fedtune import models

        models.set_tunable(ctx.model, initial)
        batches = [b for cid in range(3) for b in ctx.client_batches(1, cid)]
        start = time.perf_counter()
        train_pass(ctx.model, batches, cfg.train, ctx.device, ctx.flops, ctx.task.loss,
                   optimizer=make_optimizer(ctx.model, cfg.train))
        central_times.append(time.perf_counter() - start)
    fed, central = statistics.median(fed_times), statistics.median(central_times)
    return {"model": model, "samples": 3 * per_client, "fedavg_round_s": fed, "centralized_s": central,
            "ratio": fed / central}


RSS_CHILD = """
import resource, sys
from fedtune import config as c
from fedtune.rundir import RunDir
from fedtune.runtimes import run
cfg = c.build_config(overrides={"model.name": sys.argv[1], "fed.clients": sys.argv[2], "fed.rounds": 1,
    "data.private_size": 900, "data.public_size": 0, "data.test_size": 64, "out": sys.argv[3]})
run(cfg, RunDir.create(cfg))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def rss_30_vs_3(model: str, tmp: Path) -> dict:
    peaks = {}
    for clients in (3, 30):
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, model, str(clients), str(tmp / f"rss{clients}")],
                             capture_output=True, text=True, check=True)
        peaks[clients] = int(out.stdout.strip().splitlines()[-1])
    return {"model": model, "peak_rss_3_mb": peaks[3] / 1e6, "peak_rss_30_mb": peaks[30] / 1e6,
            "ratio": peaks[30] / peaks[3]}


def padding_throughput(model: str, samples: int) -> dict:
    out = {"model": model, "samples": samples}
    for padding in ("max_length", "dynamic"):
        cfg = configlib.build_config(overrides={
            "model.name": model, "data.private_size": samples, "data.public_size": 0, "data.test_size": 16,
            "fed.clients": 1, "data.padding": padding,
        })
        ctx = Context.build(cfg)
        batches = ctx.client_batches(1, 0)
        start = time.perf_counter()
        train_pass(ctx.model, batches, cfg.train, ctx.device, ctx.flops, ctx.task.loss)
        out[f"{padding}_samples_per_s"] = samples / (time.perf_counter() - start)
        out[f"{padding}_mean_width"] = sum(b.input_ids.shape[1] for b in batches) / len(batches)
    out["speedup"] = out["dynamic_samples_per_s"] / out["max_length_samples_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--padding-models", default="minilm,smollm2")
    p.add_argument("--per-client", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/fedavg_core.json")
    args = p.parse_args()
    tmp = Path("runs/bench-core") / time.strftime("%Y%m%d-%H%M%S")
    tmp.mkdir(parents=True, exist_ok=True)
    results = {
        "torch_threads": torch.get_num_threads(),
        "round_vs_centralized": round_vs_centralized(args.model, args.per_client, args.repeats),
        "rss_30_vs_3_clients": rss_30_vs_3(args.model, tmp),
        "padding": [padding_throughput(m, 128 if m == "smollm2" else 512) for m in args.padding_models.split(",")],
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
