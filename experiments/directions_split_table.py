"""The table of docs/results/directions/split/README.md from a sweep of experiments/directions-split.toml:
    python experiments/directions_split_table.py runs/sweep-directions-split [--png FIGURE] [--modelled]
Per grid, over seeds: final test accuracy, MB per client per round (activations and adapters, up and
down), client GFLOPs per client per round, and each direction's own record (cuts, modelled latency,
tokens per precision tier)."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1%} ± {statistics.stdev(xs):.1%}" if len(xs) > 1 else f"{xs[0]:.1%}"


ORDER = ["baseline", "client_layers", "auto", "act_budget", "int8_top25", "random25", "loss25"]


def collect(root: str) -> dict[str, list[Path]]:
    runs = defaultdict(list)
    for summary in sorted(Path(root).glob("*/summary.json")):
        runs[summary.parent.name.split("__")[0]].append(summary.parent)
    return dict(sorted(runs.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def figure(root: str, png: str) -> None:
    """Final accuracy against MB per client per round and client GFLOPs per round, one point per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (grid, dirs) in enumerate(collect(root).items()):
        ss = [json.loads((d / "summary.json").read_text()) for d in dirs]
        mb = [s["mb_up_per_client_per_round"] + s["mb_down_per_client_per_round"] for s in ss]
        gf = [s["gflops_per_client_per_round"] for s in ss]
        acc = [100 * s["final_test_accuracy"] for s in ss]
        for ax, x in zip(axes, (mb, gf)):
            label = f"{grid} ({ss[0]['rounds']} rounds)"
            ax.scatter(x, acc, color=f"C{i}", label=label if ax is axes[0] else None, s=40)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("MB per client per round (up + down, serialized; log scale)")
    axes[1].set_xlabel("client GFLOPs per client per round (analytic)")
    axes[0].set_ylabel("final test accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="setting (one point per seed)", title_fontsize=8)
    fig.suptitle("Split-FedLLM directions vs the split baseline (MiniLM, Banking77 10 intents, 3 clients x 50 rows)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(root: str) -> None:
    runs = collect(root)
    print("| setting | seeds | final acc | MB up / client / round | MB down | MB total | client GFLOPs / client / round | "
          "what the direction chose |")
    print("|---|---|---|---|---|---|---|---|")
    for grid, dirs in runs.items():
        acc, up, down, gflops, notes = [], [], [], [], ""
        for d in dirs:
            s = json.loads((d / "summary.json").read_text())
            acc.append(s["final_test_accuracy"])
            up.append(s["mb_up_per_client_per_round"])
            down.append(s["mb_down_per_client_per_round"])
            gflops.append(s["gflops_per_client_per_round"])
        records = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
        clients = [r for r in records if r["client"] != "server"]
        server = [r for r in records if r["client"] == "server"][-1]
        if "client_layers" in server and len(set(server["client_layers"])) > 1:
            per = defaultdict(list)
            for r in clients:
                per[r["client"]].append(r["client_flops"] / 1e9)
            notes = "cuts " + str(server["client_layers"]) + ", GFLOPs per client " + str(
                [round(statistics.mean(v), 1) for _, v in sorted(per.items())])
        if "modelled_round_latency_s" in server:
            notes += f"; modelled latency per client {server['modelled_latency_s']} s"
        if "act_tokens_fp32" in clients[0]:
            tiers = ("fp32", "fp16", "int8", "sparse", "dropped")
            total = {t: sum(r[f"act_tokens_{t}"] for r in clients) for t in tiers}
            n = sum(total.values())
            notes += "tokens " + ", ".join(f"{t} {total[t] / n:.0%}" for t in tiers if total[t])
        mean = lambda xs: statistics.mean(xs)  # noqa: E731
        print(f"| {grid} | {len(dirs)} | {mean_std(acc)} | {mean(up):.3f} | {mean(down):.3f} | {mean(up) + mean(down):.3f} "
              f"| {mean(gflops):.1f} | {notes} |")


def modelled(root: str, fixed: int = 2) -> None:
    """The cost model's latency per client at every cut, for the auto run's profiles (loads the model)."""
    from fedtune.frameworks.split import plan as split_plan
    from fedtune.config import build_config
    from fedtune.frameworks.base import Context
    from fedtune.frameworks.split import SplitFramework

    cfg = build_config("demo", next(Path(root).glob("auto__*/config.toml")))
    fw = SplitFramework(Context.build(cfg))
    depth = len(fw.split.glue.blocks)
    print("| client | profile [FLOP/s, MB, Mbps] | " + " | ".join(f"cut {c}" for c in range(1, depth)) + " | chosen |")
    print("|---|---|" + "---|" * depth)
    for cid, w in enumerate(fw.workloads(depth)):
        p = cfg.split.client_profiles[cid]
        options = split_plan.costs(w, split_plan.Profile(*p), cfg.split.server_flops_per_s)
        cells = [f"{o.latency_s:.2f} s{'' if o.memory_mb <= p[1] else ' (no memory)'}" for o in options]
        print(f"| {cid} | {p} | " + " | ".join(cells) + f" | {fw.cuts[cid]} |")
    base = max(o.latency_s for cid, w in enumerate(fw.workloads(depth))
               for o in split_plan.costs(w, split_plan.Profile(*cfg.split.client_profiles[cid]),
                                         cfg.split.server_flops_per_s) if o.cut == fixed)
    print(f"\nmodelled round latency: chosen cuts {fw.cuts} {max(c.latency_s for c in fw.plan):.2f} s; "
          f"cut {fixed} for all {base:.2f} s")


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "runs/sweep-directions-split"
    main(root)
    if "--png" in sys.argv:
        figure(root, sys.argv[sys.argv.index("--png") + 1])
    if "--modelled" in sys.argv:
        modelled(root)
