"""The continual-learning sweep's tables: per point the forgetting matrix A[i][j] (accuracy on
task j after task i's last round), the average forgetting and the final mean task accuracy,
then the mean over seeds per (framework, method).
Usage: python docs/results/directions/continual/analyze.py runs/sweep-continual > tables.md"""
import json
import pathlib
import statistics as st
import sys

root = pathlib.Path(sys.argv[1])
points, groups = [], {}
for d in sorted(root.iterdir()):
    if not (d / "summary.json").is_file():
        continue
    s = json.loads((d / "summary.json").read_text())
    if "forgetting_matrix" not in s:
        continue
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    clients = [r for r in recs if r["client"] != "server"]
    mb = sum(r["bytes_up"] + r["bytes_down"] for r in clients) / len(clients) / 1e6
    gflops = sum(r.get("client_flops", 0) for r in clients) / len(clients) / 1e9
    name, seed = d.name.rsplit("__", 1)
    points.append((d.name, s))
    groups.setdefault(name, []).append((s["forgetting"], s["average_task_accuracy"], s["final_test_accuracy"], mb, gflops))

pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
print("## Forgetting matrices (rows: after task i; columns: accuracy on task j, %)\n")
for name, s in points:
    m = s["forgetting_matrix"]
    print(f"**{name}**: average forgetting {pct(s['forgetting'])} points, final mean task accuracy "
          f"{pct(s['average_task_accuracy'])}%\n")
    print("| after task | " + " | ".join(f"task {j}" for j in range(len(m[0]))) + " |")
    print("|---|" + "---|" * len(m[0]))
    for i, row in enumerate(m):
        print(f"| {i} | " + " | ".join(pct(a) for a in row) + " |")
    print()
print("## Summary (mean over seeds; ± sample std where there are two or more)\n")
print("| point | seeds | average forgetting (points) | final mean task accuracy (%) | final test accuracy (%) "
      "| MB / client / round | client GFLOPs / round |")
print("|---|---|---|---|---|---|---|")
for name, runs in groups.items():
    f = lambda xs: pct(st.fmean(xs)) + (f" ± {pct(st.stdev(xs))}" if len(xs) > 1 else "")  # noqa: E731
    cols = list(zip(*runs))
    print(f"| {name} | {len(runs)} | {f(cols[0])} | {f(cols[1])} | {f(cols[2])} | {st.fmean(cols[3]):.3f} "
          f"| {st.fmean(cols[4]):.1f} |")
