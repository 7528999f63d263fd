"""The personalization report: each client's own model on its own test rows, per method and label
skew, against global fedavg (``none``) over the same seeds, from the run directories of
experiments/personalization.toml.

    fedtune sweep experiments/personalization.toml
    python benchmarks/personalization_report.py runs/sweep-personalization --out docs/results/personalization

Per grid and Dirichlet alpha, each method's last-round client statistics (the mean over clients
of each client's accuracy on its own rows, the worst client, the 10th percentile), the global
test accuracy, MB per client per round and client GFLOPs per round: the mean over seeds with its
95% t interval, and the paired difference against ``none`` of the same grid, alpha and seeds
(a method wins or loses only when that interval excludes zero).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedtune import config as configlib  # noqa: E402
from fedtune.report import stats  # noqa: E402

ORDER = ["none", "finetune", "head", "rep", "ditto", "lora_b", "dual_lora", "prompt", "client_part"]
COLORS = dict(zip(ORDER, plt.get_cmap("tab10").colors))
FIGURES = {"client mean": "client_test_accuracy_mean", "worst client": "client_test_accuracy_worst",
           "10th percentile": "client_test_accuracy_p10", "global test": "final_test_accuracy"}


def load(sweep: Path) -> list[dict]:
    runs = []
    for d in sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file()):
        cfg = configlib.flatten(configlib.read_tree(d / "config.toml"))
        summary = json.loads((d / "summary.json").read_text())
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        server = [r for r in records if r["client"] == "server"]
        runs.append({"grid": d.name.split("__")[0], "alpha": cfg["data.dirichlet_alpha"], "seed": cfg["seed"],
                     "method": cfg["fed.personalization"], "cfg": cfg, **summary,
                     "curve": [(r["round"], r["client_test_accuracy_mean"]) for r in server
                               if r.get("client_test_accuracy_mean") is not None],
                     "test_curve": [(r["round"], r["test_accuracy"]) for r in server
                                    if r.get("test_accuracy") is not None]})
    return runs


def groups(runs: list[dict]) -> dict[tuple, dict[str, dict[int, dict]]]:
    """(grid, alpha) -> method -> seed -> run."""
    out: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in runs:
        out.setdefault((r["grid"], r["alpha"]), {}).setdefault(r["method"], {})[r["seed"]] = r
    return out


def cell(by_seed: dict[int, dict], key: str, scale: float = 100, digits: int = 1) -> str:
    """Mean ± the 95% t half-width over seeds (accuracies in %, scale 100; losses as they are)."""
    values = [r[key] for r in by_seed.values() if r.get(key) is not None]
    if not values:
        return "not measured"
    ci = stats.t_interval(values)
    mean, half = scale * ci.mean, scale * ci.half
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if ci.n > 1 else f"{mean:.{digits}f}"


def diff_cell(by_seed: dict[int, dict], base: dict[int, dict], key: str, scale: float = 100,
              digits: int = 1) -> tuple[str, str]:
    mine = {s: r[key] for s, r in by_seed.items() if r.get(key) is not None}
    theirs = {s: r[key] for s, r in base.items() if r.get(key) is not None}
    d = stats.paired(mine, theirs)
    if d.n < 2:
        return "", ""
    f = lambda x: f"{scale * x:+.{digits}f}"  # noqa: E731
    return f"{f(d.mean)} [{f(d.low)}, {f(d.high)}]", stats.verdict(d)


def mean_of(runs: dict[int, dict], key: str) -> float:
    return sum(r[key] for r in runs.values()) / len(runs)


def costs(runs: dict[int, dict]) -> str:
    """MB up per client per round and client GFLOPs per round, means over seeds (table cells)."""
    return f"{mean_of(runs, 'mb_up_per_client_per_round'):.3f} | {mean_of(runs, 'gflops_per_client_per_round'):.0f}"


def table(methods: dict[str, dict[int, dict]], key: str) -> list[str]:
    """One row per method: its figures and the paired difference in ``key`` against ``none``."""
    head = ("| method | seeds | client mean (%) | paired diff. to none, points [95% CI] | verdict | worst client (%) "
            "| 10th pct. (%) | global test (%) | MB up / client / round | client GFLOPs / round |")
    rows = [head, "|---" * 10 + "|"]
    base = methods.get("none", {})
    for m in sorted(methods, key=ORDER.index):
        runs = methods[m]
        diff, word = ("baseline", "") if m == "none" else diff_cell(runs, base, key)
        rows.append(f"| {m} | {len(runs)} | {cell(runs, 'client_test_accuracy_mean')} | {diff} | {word} | "
                    f"{cell(runs, 'client_test_accuracy_worst')} | {cell(runs, 'client_test_accuracy_p10')} | "
                    f"{cell(runs, 'final_test_accuracy')} | {costs(runs)} |")
    return rows


def headline(found: dict[tuple, dict]) -> list[str]:
    """The README's table: client mean accuracy with its paired difference to none, per alpha."""
    alphas = sorted(a for g, a in found if g == "lora")
    rows = ["| method | " + " | ".join(f"alpha {a:g}: client mean (%) | diff. to none [95% CI]" for a in alphas)
            + " | MB up / client / round |", "|---" * (1 + 2 * len(alphas) + 1) + "|"]
    for m in sorted({m for a in alphas for m in found["lora", a]}, key=ORDER.index):
        cells = []
        for a in alphas:
            runs, base = found["lora", a].get(m, {}), found["lora", a].get("none", {})
            diff = "baseline" if m == "none" else diff_cell(runs, base, "client_test_accuracy_mean")[0]
            cells += [cell(runs, "client_test_accuracy_mean") if runs else "", diff]
        any_runs = next(found["lora", a][m] for a in alphas if m in found["lora", a])
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {mean_of(any_runs, 'mb_up_per_client_per_round'):.3f} |")
    return rows


def split_table(methods: dict[str, dict[int, dict]]) -> list[str]:
    rows = ["| method | seeds | global test (%) | paired diff. to none, points [95% CI] | verdict "
            "| MB up / client / round | client GFLOPs / round |", "|---" * 7 + "|"]
    base = methods.get("none", {})
    for m in sorted(methods, key=ORDER.index):
        runs = methods[m]
        diff, word = ("baseline", "") if m == "none" else diff_cell(runs, base, "final_test_accuracy")
        rows.append(f"| {m} | {len(runs)} | {cell(runs, 'final_test_accuracy')} | {diff} | {word} | {costs(runs)} |")
    return rows


def sft_table(methods: dict[str, dict[int, dict]]) -> list[str]:
    """The sft setting: each client's response loss on its own rows (lower is better, so a method
    wins when its paired difference to none lies below zero)."""
    rows = ["| method | seeds | client response loss, mean | paired diff. to none [95% CI] | verdict "
            "| worst client loss | client token acc. (%) | global test loss | MB up / client / round "
            "| client GFLOPs / round |", "|---" * 10 + "|"]
    base = methods.get("none", {})
    for m in sorted(methods, key=ORDER.index):
        runs = methods[m]
        diff, word = ("baseline", "") if m == "none" else diff_cell(runs, base, "client_test_loss_mean", 1, 3)
        word = {"wins": "loses", "loses": "wins"}.get(word, word)  # a lower loss is the better one
        rows.append(f"| {m} | {len(runs)} | {cell(runs, 'client_test_loss_mean', 1, 3)} | {diff} | {word} | "
                    f"{cell(runs, 'client_test_loss_worst', 1, 3)} | {cell(runs, 'client_test_accuracy_mean')} | "
                    f"{cell(runs, 'final_test_loss', 1, 3)} | {costs(runs)} |")
    return rows


def mean_curve(runs: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    per_round: dict[int, list[float]] = {}
    for r in runs.values():
        for rnd, acc in r[key]:
            per_round.setdefault(rnd, []).append(acc)
    rounds = sorted(k for k, v in per_round.items() if len(v) == len(runs))
    return rounds, [100 * sum(per_round[k]) / len(per_round[k]) for k in rounds]


def seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def curves(found: dict[tuple, dict], grid: str, path: Path) -> None:
    alphas = sorted(a for g, a in found if g == grid)
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.2 * len(alphas), 4.2), sharey=True, squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        methods = found[grid, alpha]
        for m in sorted(methods, key=ORDER.index):
            x, y = mean_curve(methods[m], "curve")
            ax.plot(x, y, marker=".", lw=2 if m == "none" else 1.2, ls="--" if m == "none" else "-",
                    color=COLORS[m], label=f"{m} ({seeds(len(methods[m]))})")
        ax.set_title(f"Dirichlet alpha = {alpha:g}", fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("client accuracy on its own test rows (%), mean over clients and seeds")
    axes[0][0].yaxis.label.set_size(8)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.suptitle("Personalization: each client's own model on its own rows, MiniLM-L6, Banking77, 10 clients",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bars(found: dict[tuple, dict], grid: str, path: Path) -> None:
    alphas = sorted(a for g, a in found if g == grid)
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4.2), sharey=True, squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        methods = sorted(found[grid, alpha], key=ORDER.index)
        width = 0.8 / len(FIGURES)
        for i, (label, key) in enumerate(FIGURES.items()):
            cis = [stats.t_interval([r[key] for r in found[grid, alpha][m].values()]) for m in methods]
            ax.bar([j + i * width for j in range(len(methods))], [100 * c.mean for c in cis], width,
                   yerr=[100 * c.half if c.n > 1 else 0 for c in cis], capsize=2, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30, fontsize=8)
        ax.set_title(f"Dirichlet alpha = {alpha:g}", fontsize=10)
    axes[0][0].set_ylabel("accuracy after the last round (%), mean and 95% CI over seeds")
    axes[0][0].yaxis.label.set_size(8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Personalization: clients' own rows (mean, worst, 10th percentile) and the global test set",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setting_line(runs: list[dict]) -> str:
    c = runs[0]["cfg"]
    return (f"MiniLM-L6 + LoRA r={c['model.lora_r']}, Banking77 (all intents), {c['fed.clients']} clients sharing "
            f"{c['data.private_size']} private rows by a Dirichlet partition over labels, every client each round, "
            f"{c['fed.rounds']} rounds, batch {c['train.batch_size']}, {c['train.precision']} frozen base; each client "
            f"holds out up to {c['data.client_test_size']} rows of its own shard as its own test rows; the global "
            f"test set has {c['data.test_size']} rows; `fed.personal_epochs` = {c['fed.personal_epochs']}, "
            f"`fed.ditto_lambda` = {c['fed.ditto_lambda']}.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/personalization"))
    args = ap.parse_args()
    runs = load(args.sweep)
    found = groups(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    text = ["# Personalization, measured", "", "```bash", "fedtune sweep experiments/personalization.toml",
            f"python benchmarks/personalization_report.py {args.sweep} --out {args.out}", "```", "",
            "Setting (experiments/personalization.toml): " + setting_line(runs), "",
            "Each cell is the mean over seeds ± the 95% t interval's half-width; the paired difference is the "
            "method minus global fedavg (`none`) over the same seeds, and a method wins or loses only when its "
            "interval excludes zero. Client figures are the last round's: under `none` each client scores the "
            "global model it receives; under a method, its personal model (docs/personalization.md). "
            "The global test accuracy of `head`, `rep` and `prompt` is that of the shared part with an untrained "
            "personal part (the server never holds it).", ""]
    for grid in [g for g in ("lora", "prompt") if any(k[0] == g for k in found)]:
        text += [f"## Grid `{grid}`", ""]
        for alpha in sorted(a for g, a in found if g == grid):
            text += [f"### Dirichlet alpha = {alpha:g}", "", *table(found[grid, alpha], "client_test_accuracy_mean"), ""]
        curves(found, grid, args.out / f"{grid}_curves.png")
        bars(found, grid, args.out / f"{grid}_final.png")
        text += [f"![client accuracy per round]({grid}_curves.png)", "", f"![final figures]({grid}_final.png)", ""]
    if any(k[0] == "split" for k in found):
        text += ["## Grid `split`: the client part kept personal", "",
                 "Split learning's clients hold half a model, so they are not scored on their own rows. The global "
                 "test accuracy is the server part with the averaged client part (`none`) or with the initial, "
                 "untrained client part (`client_part`: no client part ever leaves a client), so it shows what the "
                 "shared server part learned on its own; the bytes show what keeping the client part saves.", ""]
        for alpha in sorted(a for g, a in found if g == "split"):
            text += [f"### Dirichlet alpha = {alpha:g}", "", *split_table(found["split", alpha]), ""]
    for (grid, alpha), methods in found.items():
        if grid == "sft":
            c = next(iter(next(iter(methods.values())).values()))["cfg"]
            text += ["## Grid `sft`: SmolLM2 on GSM8K, clients partitioned by response length", "",
                     f"SmolLM2-135M-Instruct + LoRA r={c['model.lora_r']}, {c['fed.clients']} clients sharing "
                     f"{c['data.private_size']} GSM8K training rows by response length (`data.partition = length`), "
                     f"{c['data.client_test_size']} of each client's rows held out as its own test rows, "
                     f"{c['fed.rounds']} rounds, batch {c['train.batch_size']}, {c['train.precision']} frozen base, "
                     f"{c['data.test_size']} global test rows. The client figures are the response loss (and the "
                     "teacher-forced token accuracy) of the model each client uses, on its own rows, after the "
                     "last round; a method wins when its paired difference in loss lies below zero.", "",
                     *sft_table(methods), ""]
    if any(k[0] == "lora" for k in found):
        text += ["## Headline (grid `lora`)", "", *headline(found), ""]
    (args.out / "report.md").write_text("\n".join(text))
    (args.out / "runs.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "cfg"} for r in runs], indent=1))


if __name__ == "__main__":
    main()
