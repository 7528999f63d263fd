"""Split-FedLLM activation compression: MB per client per round (activations vs adapters),
accuracy, and client vs server compute for each split.act_dtype and a top-k setting, with
FedAvg on the same setting for reference. Writes a markdown table (stdout and --md).

    python benchmarks/split_compression.py --md benchmarks/split_compression.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtune import config as configlib  # noqa: E402
from fedtune.metrics import MB  # noqa: E402
from fedtune.rundir import RunDir  # noqa: E402
from fedtune.runtimes import run  # noqa: E402

# "fedavg", or a split setting "act_dtype" / "act_dtype:act_topk"
SETTINGS = "fedavg,fp32,fp16,bf16,int8,fp32:0.25,int8:0.25"


def parse_setting(text: str) -> tuple[str, str, float]:
    """-> (framework, act_dtype, act_topk)."""
    if text == "fedavg":
        return "fedavg", "fp32", 0.0
    dtype, _, topk = text.partition(":")
    return "split", dtype, float(topk or 0.0)


def mean(records, key):
    return sum(r.get(key, 0) or 0 for r in records) / max(len(records), 1)


def one_run(args, framework, dtype, topk, out):
    overrides = {
        "framework": framework, "model.name": args.model, "fed.rounds": args.rounds, "fed.clients": args.clients,
        "data.private_size": args.private, "data.public_size": 100, "data.test_size": args.test,
        "data.max_labels": args.max_labels, "split.split_layer": args.split_layer, "split.act_dtype": dtype,
        "split.act_topk": topk, "train.threads": args.threads, "out": out,
    }
    cfg = configlib.build_config("demo", None, overrides)
    start = time.perf_counter()
    rundir = RunDir.create(cfg)
    summary = run(cfg, rundir)
    records = rundir.metrics.records()
    clients = [r for r in records if r["client"] != "server"]
    servers = [r for r in records if r["client"] == "server"]
    act = mean(clients, "bytes_up_link") + mean(clients, "bytes_down_link")
    total = mean(clients, "bytes_up") + mean(clients, "bytes_down")
    return {
        "setting": framework if framework == "fedavg" else f"split {dtype}" + (f" top-{topk:g}" if topk else ""),
        "acc": summary["final_test_accuracy"],
        "act_mb": act / MB,
        "adapter_mb": (total - act) / MB,
        "total_mb": total / MB,
        "client_gflops": mean(clients, "client_flops") / 1e9,
        "client_s": mean(clients, "client_seconds"),
        "server_gflops": mean(servers, "server_flops") / 1e9,
        "server_s": mean(servers, "server_train_seconds"),
        "wall_s": time.perf_counter() - start,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--private", type=int, default=300)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--max-labels", type=int, default=4)
    p.add_argument("--split-layer", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default=SETTINGS, help="comma-separated: fedavg, fp32, int8, int8:0.25 ...")
    p.add_argument("--md", default="")
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(args.settings.split(",")):
            rows.append(one_run(args, *parse_setting(setting.strip()), os.path.join(tmp, str(i))))
            print(rows[-1], file=sys.stderr, flush=True)

    lines = [
        f"Setting: {args.model}, {args.clients} clients x {args.private // args.clients} private rows, "
        f"{args.max_labels} labels (chance {1 / args.max_labels:.0%}), {args.rounds} rounds, "
        f"{args.test} test rows, split after block {args.split_layer}. Per client per round, both directions.",
        "",
        "| setting | test acc | activations MB | adapters MB | total MB | client GFLOPs | client s | "
        "server GFLOPs (all clients) | server s (all clients) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['acc']:.1%} | {r['act_mb']:.3f} | {r['adapter_mb']:.3f} | {r['total_mb']:.3f} | "
            f"{r['client_gflops']:.1f} | {r['client_s']:.1f} | {r['server_gflops']:.1f} | {r['server_s']:.1f} | "
            f"{r['wall_s']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.md:
        command = "python benchmarks/split_compression.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.md, "w") as fh:
            fh.write(f"# Split-FedLLM activation compression\n\nCommand: `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
