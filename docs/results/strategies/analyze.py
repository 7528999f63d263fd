"""Extra figures for report.md: the mean of the last 3 rounds (the curves swing from round to
round under 30% sampling of skewed clients) and the accuracy at equal cumulative traffic.
Usage: python docs/results/strategies/analyze.py runs/sweep-strategies"""
import json, pathlib, statistics as st, sys
root = pathlib.Path(sys.argv[1])
rows = {}
for d in sorted(root.iterdir()):
    if not (d / "summary.json").is_file():
        continue
    name, seed = d.name.split("__")
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    acc = [r["test_accuracy"] for r in recs if r["client"] == "server"]
    mb = [(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in recs if r["client"] != "server"]
    per_round_mb = sum(mb) / len(mb)
    rows.setdefault(name, []).append((seed, acc, per_round_mb))
print("| strategy | seeds | final | mean of rounds 6-8 | best | MB/client/round | MB a participating client moves in 8 rounds | acc at the round where cumulative MB = FedAvg's 8 rounds |")
print("|---|---|---|---|---|---|---|---|")
fedavg_mb = 8 * rows["fedavg"][0][2]
for name, runs in rows.items():
    f = lambda xs: f"{100*st.fmean(xs):.1f}" + (f" ± {100*st.stdev(xs):.1f}" if len(xs) > 1 else "")
    k = round(fedavg_mb / runs[0][2])  # the round at which its traffic equals FedAvg's 8 rounds
    print(f"| {name} | {len(runs)} | {f([a[-1] for _, a, _ in runs])} | {f([st.fmean(a[-3:]) for _, a, _ in runs])} | "
          f"{f([max(a) for _, a, _ in runs])} | {runs[0][2]:.3f} | {8*runs[0][2]:.2f} | round {k}: {f([a[k-1] for _, a, _ in runs])} |")
