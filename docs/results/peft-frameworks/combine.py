"""The PEFT-method table (methods x frameworks) and methods.png from the two sweep reports of
experiments/peft-frameworks.toml: report.json (fedavg, split lora/dora) and kd_split/report.json (kd, the
other split cells). Usage: python docs/results/peft-frameworks/combine.py [--png docs/results/peft-frameworks/methods.png]"""
import json, pathlib, sys

here = pathlib.Path(__file__).resolve().parent
cells = {}  # (method, framework) -> stats
for path in (here / "report.json", here / "kd_split" / "report.json"):
    for s in json.loads(path.read_text())["settings"]:
        v = s["values"]
        method = "FFA-LoRA" if v.get("model.lora_freeze_a") else v.get("model.peft", "lora")
        cells[method, s["framework"]] = s["stats"]
METHODS = ["lora", "FFA-LoRA", "dora", "ia3", "prompt", "prefix"]
FRAMEWORKS = ["fedavg", "kd", "split"]

print("| method | " + " | ".join(FRAMEWORKS) + " |")
print("|---|" + "---|" * len(FRAMEWORKS))
for m in METHODS:
    row = []
    for f in FRAMEWORKS:
        s = cells.get((m, f))
        row.append(f"{100*s['final_acc'][0]:.1f}% · {s['mb'][0]:.3g} MB · {s['gflops'][0]:.0f} GF" if s
                   else ("refused (does not fit the cut)" if (m, f) == ("prefix", "split") else "-"))
    print(f"| {m} | " + " | ".join(row) + " |")

if "--png" in sys.argv:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    markers = {"fedavg": "o", "kd": "s", "split": "^"}
    for ax, (key, label, log) in zip(axes, [("mb", "MB per client per round (up + down, log scale)", True),
                                           ("gflops", "client GFLOPs per round", False)]):
        for (m, f), s in cells.items():
            ax.scatter(s[key][0], 100 * s["final_acc"][0], marker=markers[f], s=70, alpha=0.8, color=f"C{METHODS.index(m)}")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (%), round 3")
    handles = [plt.Line2D([], [], marker=markers[f], ls="", color="0.3", label=f) for f in FRAMEWORKS]
    handles += [plt.Line2D([], [], marker="o", ls="", color=f"C{i}", label=m) for i, m in enumerate(METHODS)]
    axes[1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("PEFT methods x frameworks (Banking77, MiniLM-L6, 3 clients x 100 rows, 3 rounds, 200 test rows, seed 0)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(sys.argv[sys.argv.index("--png") + 1], dpi=120)
