"""Cross-device scale: the same Banking77 training rows (a Dirichlet partition) over 10 and over
1,000 clients, 10 sampled a round in both (fed.fraction = 1.0 and 0.01). Each size runs in its
own process, so its peak memory (max RSS) is its own.

    python benchmarks/scale.py                       # tiny-gpt2, 3 rounds
    python benchmarks/scale.py --model minilm --rounds 3 --set fed.strategy=scaffold

Printed per size: setup seconds (data, tokenization of every client's rows, model), median round
seconds, rows trained a round and seconds per 1,000 rows trained (a round's time should follow
the sampled clients' rows, not the number of clients), and peak RSS; then the ratios the scale
target reads (peak memory of 1,000 clients / 10 clients <= 1.25).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = (10, 1000)
SAMPLED = 10


def one(clients: int, model: str, rounds: int, extra: list[str]) -> dict:
    from fedtune import cli
    from fedtune import config as configlib
    from fedtune.rundir import RunDir
    from fedtune.runtimes import run

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"model.name": model, "fed.clients": clients, "fed.fraction": SAMPLED / clients,
                     "data.partition": "dirichlet", "data.private_size": 0, "data.max_labels": 0,
                     "fed.rounds": rounds, "out": str(Path(tmp) / "run"), **configlib.parse_overrides(extra)}
        cfg = configlib.build_config("demo", None, overrides)
        start = time.perf_counter()
        cli.preflight(cfg)
        rundir = RunDir.create(cfg)
        summary = run(cfg, rundir)
        total = time.perf_counter() - start
        records = rundir.metrics.records()
    server = [r for r in records if r["client"] == "server"]
    rows = [sum(r["num_samples"] for r in records if r["client"] != "server" and r["round"] == s["round"])
            for s in server]
    round_s = [s["round_seconds"] for s in server]
    return {"clients": clients, "setup_s": total - summary["wall_seconds"], "round_s": statistics.median(round_s),
            "rows_per_round": statistics.mean(rows), "s_per_1000_rows": 1000 * sum(round_s) / max(sum(rows), 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "accuracy": summary.get("final_test_accuracy")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size, JSON out
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.rounds, args.set)))
        return
    results = []
    for n in SIZES:
        cmd = [sys.executable, __file__, "--one", str(n), "--model", args.model, "--rounds", str(args.rounds)]
        cmd += [a for s in args.set for a in ("--set", s)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"## Scale: {args.model}, {args.rounds} rounds, {SAMPLED} clients sampled a round "
          f"{' '.join('--set ' + s for s in args.set)}".rstrip())
    print()
    print("| clients | setup s | round s (median) | rows a round | s per 1,000 rows | peak RSS MB | accuracy |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['setup_s']:.1f} | {r['round_s']:.2f} | {r['rows_per_round']:.0f} | "
              f"{r['s_per_1000_rows']:.2f} | {r['peak_rss_mb']:.0f} | {r['accuracy']:.3f} |")
    small, large = results
    print()
    print(f"peak memory 1,000 / 10 clients: {large['peak_rss_mb'] / small['peak_rss_mb']:.2f} (target <= 1.25); "
          f"seconds per 1,000 rows trained, 1,000 / 10 clients: "
          f"{large['s_per_1000_rows'] / small['s_per_1000_rows']:.2f}")


if __name__ == "__main__":
    main()
