"""The server_lr sweep (experiments/server_lr.toml): a table of final accuracy, mean of the last
3 rounds and best round per (strategy, server_lr), and server_lr.png: accuracy against the server
step, one colour per adaptive optimizer, FedAvg (same seed) and SCAFFOLD as horizontal references.
The figure also shows, hollow, the 2-seed means of docs/results/strategies (one server_lr each).
Usage: python docs/results/server_lr/analyze.py runs/sweep-server_lr [--png docs/results/server_lr/server_lr.png]"""
import json, pathlib, statistics as st, sys

root = pathlib.Path(sys.argv[1])
png = sys.argv[sys.argv.index("--png") + 1] if "--png" in sys.argv else None
rows = {}  # (strategy, server_lr or None) -> (per-round accuracies, MB per client per round)
for d in sorted(root.iterdir()):
    if not (d / "summary.json").is_file():
        continue
    cfg = (d / "config.toml").read_text()
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    acc = [r["test_accuracy"] for r in recs if r["client"] == "server"]
    mb = [(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in recs if r["client"] != "server"]
    strategy = d.name.split("__")[0]
    lr = float(d.name.split("server_lr-")[1].split("__")[0]) if "server_lr-" in d.name else None
    rows[strategy, lr] = (acc, sum(mb) / len(mb))

print("| strategy | server_lr | final | mean of last 3 rounds | best (round) | MB/client/round |")
print("|---|---|---|---|---|---|")
for (s, lr), (acc, mb) in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
    best = max(range(len(acc)), key=lambda i: acc[i])
    print(f"| {s} | {'-' if lr is None else f'{lr:g}'} | {100*acc[-1]:.1f} | {100*st.fmean(acc[-3:]):.1f} | "
          f"{100*acc[best]:.1f} ({best+1}) | {mb:.3f} |")

if png:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    here = pathlib.Path(__file__).resolve().parent
    committed = json.loads((here.parent / "strategies" / "report.json").read_text())["settings"]
    prior = {c["values"]["fed.strategy"]: (c["values"].get("fed.server_lr", 1.0), c["stats"]["final_acc"])
             for c in committed if not c["values"].get("fed.prox_mu")}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, s in enumerate(["fedadam", "fedyogi", "fedadagrad", "fedavgm"]):
        pts = sorted((lr, 100 * acc[-1]) for (s2, lr), (acc, _) in rows.items() if s2 == s and lr is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=f"C{i}", ms=8, label=f"{s}, seed 0 (this sweep)")
        if s in prior:
            lr, (mean, sd) = prior[s]
            shift = 1.12 if s == "fedyogi" else 1.0  # it equals fedadam there: drawn beside it
            ax.errorbar([lr * shift], [100 * mean], [100 * sd], fmt="o", mfc="none", color=f"C{i}", capsize=3,
                        label=f"{s}, 2 seeds (strategies report)" + (", shifted right" if shift > 1 else ""))
    if ("fedavg", None) in rows:
        ax.axhline(100 * rows["fedavg", None][0][-1], color="k", ls="--", lw=1.2, label="fedavg, seed 0")
    mean, sd = prior["scaffold"][1]
    ax.axhspan(100 * (mean - sd), 100 * (mean + sd), color="0.85", label="scaffold, 2 seeds (mean ± sd)")
    ax.set_xscale("log")
    ax.set_xlabel("fed.server_lr (log scale)")
    ax.set_ylabel("final test accuracy (%), round 8")
    ax.set_title("Adaptive server optimizers vs their step size\nBanking77 top-20, MiniLM, Dirichlet 0.1, 3 of 10 clients a round", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
