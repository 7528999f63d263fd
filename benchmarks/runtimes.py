"""Wall time per round of the same tiny fedavg job in-process, on Flower's simulation engine
and on Flower's deployment engine (SuperLink + SuperNodes on 127.0.0.1, TLS and SuperNode
authentication on), plus the split channel's per-exchange overhead.

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

sys.path.insert(0, str(Path(__file__).parent))
import split_channel  # noqa: E402

JOB = {
    "model.name": "tiny-gpt2", "data.private_size": 300, "data.public_size": 100, "data.test_size": 100,
    "data.max_labels": 4, "fed.clients": 3, "train.threads": 1,
}


def one(runtime: str, rounds: int, out: Path) -> dict:
    cfg = configlib.build_config("demo", None, {**JOB, "fed.rounds": rounds, "runtime": runtime, "out": str(out)})
    start = time.perf_counter()
    summary = run(cfg, RunDir.create(cfg))
    total = time.perf_counter() - start
    rounds_s = [r["round_seconds"] for r in RunDir(out).metrics.records() if r["client"] == "server"]
    return {"total": total, "rounds": rounds_s, "acc": summary["final_test_accuracy"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtimes", default="inprocess,flower-sim,flower")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    print(f"tiny fedavg job: {JOB}, {args.rounds} rounds; seconds\n")
    print("| runtime | total wall | round 1 | later rounds (median) | final accuracy |")
    print("|---|---:|---:|---:|---:|")
    for runtime in args.runtimes.split(","):
        r = one(runtime, args.rounds, tmp / runtime)
        later = statistics.median(r["rounds"][1:]) if len(r["rounds"]) > 1 else float("nan")
        print(f"| {runtime} | {r['total']:.1f} | {r['rounds'][0]:.1f} | {later:.1f} | {r['acc']:.4f} |")
        sys.stdout.flush()
    raw = statistics.median(split_channel.time_raw(1_000_000, 30))
    grpc = statistics.median(split_channel.time_channel(1_000_000, 30, None))
    print(f"\nsplit channel, 1 MB each way per exchange: {1e3 * grpc:.2f} ms vs {1e3 * raw:.2f} ms raw TCP: "
          f"overhead {1e3 * (grpc - raw):+.2f} ms per exchange (benchmarks/split_channel.md has all sizes)")


if __name__ == "__main__":
    main()
