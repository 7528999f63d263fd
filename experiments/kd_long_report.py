"""docs/results/kd-long: kd's curve over 25 rounds with and without the clients distilling the
server's knowledge, and the diagnostics that say where the server's accuracy goes: the merged
teacher's accuracy on the public rows (``kd_teacher_public_accuracy``), the server model's there
after distilling (``kd_server_public_accuracy``) and the clients' own models on the test rows.

Usage: python experiments/kd_long_report.py runs/kd-long --out docs/results/kd-long"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedtune.rundir import RunDir  # noqa: E402

RUNS = {"kd-seed0": "clients distil the server (kd.client_kd_weight = 0.5, default)",
        "kd-noclientkd-seed0": "clients do not distil (kd.client_kd_weight = 0)"}


def curve(run: Path) -> list[dict]:
    records = list(RunDir(run).metrics.records())
    out = []
    for s in (r for r in records if r["client"] == "server"):
        clients = [r for r in records if r["client"] != "server" and r["round"] == s["round"]]
        out.append({"round": s["round"], "test": s["test_accuracy"],
                    "teacher": s.get("kd_teacher_public_accuracy"), "server_public": s.get("kd_server_public_accuracy"),
                    "clients": sum(r["client_test_accuracy"] for r in clients) / len(clients),
                    "kd_loss": s.get("server_kd_loss")})
    return out


def mean(rows: list[dict], key: str, first: int, last: int) -> float:
    xs = [r[key] for r in rows if first <= r["round"] <= last and r[key] is not None]
    return 100 * sum(xs) / len(xs)


def figure(curves: dict[str, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for (name, rows), color in zip(curves.items(), ("tab:red", "tab:blue")):
        x = [r["round"] for r in rows]
        axes[0].plot(x, [100 * r["test"] for r in rows], color=color, marker=".", label=RUNS[name])
        axes[1].plot(x, [100 * r["teacher"] for r in rows], color=color, marker=".",
                     label=f"teacher on public rows, {RUNS[name].split(' (')[0]}")
        axes[1].plot(x, [100 * r["clients"] for r in rows], color=color, ls="--",
                     label=f"clients' own models on test rows, {RUNS[name].split(' (')[0]}")
    axes[0].set_title("server model: test accuracy (400 rows)", fontsize=10)
    axes[1].set_title("what the server learns from, and the clients' models", fontsize=10)
    axes[0].set_ylabel("accuracy (%)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("kd over 25 rounds: MiniLM-L6, Banking77, 3 clients x 200 rows, 400 public rows, seed 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/kd-long"))
    args = ap.parse_args()
    curves = {name: curve(args.runs / name) for name in RUNS}
    args.out.mkdir(parents=True, exist_ok=True)
    figure(curves, args.out / "curves.png")
    lines = ["| run | rounds | server test (%) | teacher on public (%) | server on public (%) | clients' own test (%) |",
             "|---|---|---|---|---|---|"]
    for name, rows in curves.items():
        for first, last in ((1, 5), (6, 10), (11, 15), (16, 20), (21, 25)):
            cells = [f"{mean(rows, k, first, last):.1f}" if any(r[k] is not None for r in rows) else "not sent"
                     for k in ("test", "teacher", "server_public", "clients")]
            lines.append(f"| {RUNS[name]} | {first}-{last} | " + " | ".join(cells) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
