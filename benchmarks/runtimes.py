"""Wall time per round of the same tiny fedavg job in-process, on Flower's simulation engine
and on Flower's deployment engine (SuperLink + SuperNodes on 127.0.0.1, TLS and SuperNode
authentication on, a warm worker beside each SuperNode); then what one message costs a
deployment with SmolLM2, with each ClientApp process building the model (before) and with
the warm workers (after); plus the split channel's per-exchange overhead.

    python benchmarks/runtimes.py [--rounds 3] > benchmarks/runtimes.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtune import config as configlib  # noqa: E402
from fedtune.rundir import RunDir  # noqa: E402
from fedtune.runtimes import run  # noqa: E402
from fedtune.runtimes.flower import LocalFederation, run_deployment  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import split_channel  # noqa: E402

JOB = {
    "model.name": "tiny-gpt2", "data.private_size": 300, "data.public_size": 100, "data.test_size": 100,
    "data.max_labels": 4, "fed.clients": 3, "train.threads": 1, "flower.wait_nodes_s": 600,
}
# One short round of SmolLM2: what matters is the cost per message, not learning.
SMOL = {
    "model.name": "smollm2", "data.private_size": 24, "data.public_size": 8, "data.test_size": 16,
    "data.max_labels": 4, "data.max_length": 32, "fed.clients": 3, "fed.rounds": 1, "train.threads": 1,
    "flower.wait_nodes_s": 600,
}


def one(job: dict, runtime: str, rounds: int, out: Path, workers: bool = True) -> dict:
    cfg = configlib.build_config("demo", None, {**job, "fed.rounds": rounds, "runtime": runtime, "out": str(out)})
    rundir = RunDir.create(cfg)
    start = time.perf_counter()
    if runtime == "flower" and not workers:
        with LocalFederation(out / "fed", rundir.path / "flower", workers=False) as fed:
            fed.start_superlink()
            for cid in range(cfg.fed.clients):
                fed.start_supernode(cid, cfg.fed.clients)
            summary = run_deployment(cfg, rundir, federation=fed)
    else:
        summary = run(cfg, rundir)
    total = time.perf_counter() - start
    records = RunDir(out).metrics.records()
    clients = [r for r in records if r["client"] != "server"]
    # What a message costs beyond the client's own round: Flower's routing, the ClientApp's
    # process and (without workers) building the model and data.
    overhead = [r["message_seconds"] - r["client_seconds"] for r in clients if "message_seconds" in r]
    return {"total": total, "rounds": [r["round_seconds"] for r in records if r["client"] == "server"],
            "acc": summary["final_test_accuracy"], "client": statistics.median(r["client_seconds"] for r in clients),
            "overhead": statistics.median(overhead) if overhead else float("nan")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtimes", default="inprocess,flower-sim,flower")
    p.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 per-message comparison")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    print(f"tiny fedavg job: {JOB}, {args.rounds} rounds; seconds\n")
    print("| runtime | total wall | round 1 | later rounds (median) | later rounds / in-process | "
          "message overhead (median) | final accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for runtime in args.runtimes.split(","):
        r = one(JOB, runtime, args.rounds, tmp / runtime)
        later = statistics.median(r["rounds"][1:]) if len(r["rounds"]) > 1 else r["rounds"][0]
        base = later if runtime == "inprocess" else base
        ratio = f"{later / base:.1f}x" if base else "-"
        print(f"| {runtime} | {r['total']:.1f} | {r['rounds'][0]:.1f} | {later:.1f} | {ratio} | "
              f"{r['overhead']:.2f} | {r['acc']:.4f} |")
        sys.stdout.flush()
    if not args.no_smollm2:
        print(f"\nSmolLM2 deployment, one round: {SMOL}; seconds\n")
        print("| ClientApp | total wall | round | client round (median) | message overhead (median) |")
        print("|---|---:|---:|---:|---:|")
        for label, workers in [("builds the model per message (before)", False),
                               ("hands to the warm worker (after)", True)]:
            r = one(SMOL, "flower", 1, tmp / f"smol-{workers}", workers)
            print(f"| {label} | {r['total']:.1f} | {r['rounds'][0]:.1f} | {r['client']:.2f} | {r['overhead']:.2f} |")
            sys.stdout.flush()
    raw = statistics.median(split_channel.time_raw(1_000_000, 30))
    grpc = statistics.median(split_channel.time_channel(1_000_000, 30, None))
    print(f"\nsplit channel, 1 MB each way per exchange: {1e3 * grpc:.2f} ms vs {1e3 * raw:.2f} ms raw TCP: "
          f"overhead {1e3 * (grpc - raw):+.2f} ms per exchange (benchmarks/split_channel.md has all sizes)")


if __name__ == "__main__":
    main()
