"""The table of docs/results/zo/README.md, "From a warm start", from the runs that
experiments/zo_warm.sh leaves in runs/zo-warm/: one row per run and round after the start.

Usage: python experiments/zo_warm_table.py [runs/zo-warm]"""

from __future__ import annotations

import sys
from pathlib import Path

from fedtune.rundir import RunDir

LABELS = {"fedavg": "fedavg (lr 1e-3, head 1e-2, 1 epoch = 25 steps)",
          "zo-1e-4": "zo, lr 1e-4, 200 steps", "zo-3e-4-long": "zo, lr 3e-4, 200 steps",
          "zo-1e-3": "zo, lr 1e-3, 200 steps", "zo-3e-3": "zo, lr 3e-3, 200 steps"}


def rows(run: Path) -> list[dict]:
    records = list(RunDir(run).metrics.records())
    out = []
    for rnd in sorted({r["round"] for r in records if r["client"] == "server"}):  # finished rounds
        clients = [r for r in records if r["round"] == rnd and r["client"] != "server"]
        server = next(r for r in records if r["round"] == rnd and r["client"] == "server")
        out.append({
            "round": rnd,
            "acc": server["test_accuracy"],
            "loss": server["test_loss"],
            "mb": sum(r["bytes_up"] + r["bytes_down"] for r in clients) / len(clients) / 1e6,
            "gflops": sum(r["client_flops"] for r in clients) / len(clients) / 1e9,
            "seconds": sum(r["client_seconds"] for r in clients) / len(clients),
            "mem": max(r.get("client_peak_mem_bytes", 0) for r in clients) / 1e6,
            "train": ", ".join(f"{r['train_loss']:.3f}" for r in clients),
        })
    return out


def main(root: Path) -> None:
    start = rows(root / "start")[-1]
    print("| run | round after the start | test accuracy | test loss | MB / client / round (up + down) "
          "| client GFLOPs / round | client s / round | client peak MB | clients' train loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| (c) the start itself: fedavg, 1 round from scratch | 0 | {start['acc']:.1%} | {start['loss']:.4f} "
          f"| {start['mb']:.4f} | {start['gflops']:.0f} | {start['seconds']:.0f} | {start['mem']:.0f} | {start['train']} |")
    for name, label in LABELS.items():
        if not (root / name / "metrics.jsonl").is_file():
            continue
        for r in rows(root / name):
            print(f"| {label} | {r['round']} | {r['acc']:.1%} | {r['loss']:.4f} | {r['mb']:.4f} | {r['gflops']:.0f} "
                  f"| {r['seconds']:.0f} | {r['mem']:.0f} | {r['train']} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/zo-warm"))
