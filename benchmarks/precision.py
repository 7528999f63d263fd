"""fp32 against train.precision = auto on the same runs and seeds: final test accuracy and wall
time, one run after another (run it on a quiet machine).

    python benchmarks/precision.py                         # MiniLM on Banking77, seeds 0-2
    python benchmarks/precision.py --model smollm2 --seeds 0 --set data.test_size=400   # the demo

Each run is ``fedtune run --model M --seed S --set train.precision=P`` (demo preset: 3 clients x
300 rows of Banking77, 3 rounds) plus the given --set keys; the default adds MiniLM's head rate
(train.head_lr = 5e-2) and 1,000 test rows. Printed: a markdown table per seed and the mean
accuracy difference (auto - fp32) with its paired 95% t interval, and the wall-time ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from fedtune.report import stats

PRECISIONS = ("fp32", "auto")


def one(model: str, seed: int, precision: str, extra: list[str], root: Path) -> dict:
    out = root / f"{model}-{precision}-seed{seed}"
    cmd = [sys.executable, "-m", "fedtune", "run", "--model", model, "--seed", str(seed), "--quiet",
           "--out", str(out), "--set", f"train.precision={precision}"]
    for kv in extra:
        cmd += ["--set", kv]
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout is the table
    summary = json.loads((out / "summary.json").read_text())
    chosen = tomllib.loads((out / "config.toml").read_text())["train"]["precision"]  # what auto picked
    return {"seed": seed, "precision": precision, "chose": chosen, "accuracy": summary["final_test_accuracy"],
            "wall_s": summary["wall_seconds"], "round_s": summary["round_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    args = ap.parse_args()
    extra = args.set if args.set is not None else ["train.head_lr=5e-2", "data.test_size=1000"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(args.model, s, p, extra, Path(tmp)) for s in args.seeds for p in PRECISIONS]
    print(f"`python benchmarks/precision.py --model {args.model}` with --set {' '.join(extra)}\n")
    print("| seed | train.precision | ran as | final test accuracy (%) | wall s | s per round |")
    print("|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['precision']} | {r['chose']} | {100 * r['accuracy']:.2f} | {r['wall_s']:.0f} "
              f"| {r['round_s']:.1f} |")
    acc = {p: {r["seed"]: r["accuracy"] for r in rows if r["precision"] == p} for p in PRECISIONS}
    wall = {p: sum(r["wall_s"] for r in rows if r["precision"] == p) for p in PRECISIONS}
    d = stats.paired(acc["auto"], acc["fp32"])
    ci = f" [{100 * d.low:+.2f}, {100 * d.high:+.2f}]" if d.n > 1 else ""
    print(f"\nauto - fp32: {100 * d.mean:+.2f} points{ci} over {d.n} seeds; "
          f"wall time fp32 / auto: {wall['fp32'] / wall['auto']:.2f}")


if __name__ == "__main__":
    main()
