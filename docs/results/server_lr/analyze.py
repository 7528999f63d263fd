"""The server_lr sweep (experiments/server_lr.toml): a table of final accuracy, mean of the last
3 rounds and best round per (strategy, server_lr), and server_lr.png: accuracy against the server
step, one line per adaptive optimizer, FedAvg and SCAFFOLD (same seed) as horizontal references.
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (title, f) in zip(axes, [("final round", lambda a: a[-1]), ("mean of the last 3 rounds", lambda a: st.fmean(a[-3:]))]):
        for i, s in enumerate(sorted({s for s, lr in rows if lr is not None})):
            pts = sorted((lr, 100 * f(acc)) for (s2, lr), (acc, _) in rows.items() if s2 == s and lr is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=s)
        for s, style in (("fedavg", "--"), ("scaffold", ":")):
            if (s, None) in rows:
                ax.axhline(100 * f(rows[s, None][0]), color="k", ls=style, lw=1.2, label=f"{s} (no server step)" if s == "fedavg" else f"{s} (server_lr 1)")
        ax.set_xscale("log")
        ax.set_xlabel("fed.server_lr (log scale)")
        ax.set_title(f"test accuracy, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Server step size of the adaptive optimizers (Banking77 top-20 intents, MiniLM, Dirichlet 0.1, 10 clients, 3 per round, 8 rounds, seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
