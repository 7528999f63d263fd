"""Sweep reports: every run directory under a folder, grouped by (framework, task, swept
values), averaged over seeds, drawn like the paper's Fig. 3 and Fig. 4, and ranked in the
form of its Table I.

The swept values are found from the configs themselves: within one (framework, task) group,
the keys whose values differ between runs (other than the seed and where the run lives).
So the report needs nothing but the run directories, however they were produced.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config as configlib
from .errors import FedtuneError
from .metrics import per_round
from .frameworks import FRAMEWORKS as FRAMEWORK_REGISTRY
from .rundir import CONFIG, METRICS, SUMMARY
from .sweep import ERROR, NOT_IDENTITY
from .tasks import TASKS as TASK_REGISTRY

FRAMEWORKS = FRAMEWORK_REGISTRY.names
TITLES = {fw: f"{FRAMEWORK_REGISTRY.title(fw)} ({fw})" for fw in FRAMEWORKS}
COLORS = {fw: f"C{i}" for i, fw in enumerate(FRAMEWORKS)}
TASKS = {task: TASK_REGISTRY.title(task) for task in TASK_REGISTRY.names}
AXIS = {"model.lora_r": "LoRA rank r", "data.public_size": "public set size (samples)",
        "split.samples_per_round": "training samples per client per round"}
SHORT = {"model.lora_r": "r", "data.public_size": "PD", "split.samples_per_round": "TS"}
NOT_SWEPT = NOT_IDENTITY | {"seed"}
DEFAULTS = configlib.flat_dict(configlib.RunConfig())

# Per-run figures, from the run's summary.json.
METRICS_OF_RUN = {
    "final_acc": lambda s: s.get("final_test_accuracy"),
    "best_acc": lambda s: s.get("best_test_accuracy"),
    "mb_up": lambda s: s.get("mb_up_per_client_per_round"),
    "mb_down": lambda s: s.get("mb_down_per_client_per_round"),
    "mb": lambda s: _add(s.get("mb_up_per_client_per_round"), s.get("mb_down_per_client_per_round")),
    "gflops": lambda s: s.get("gflops_per_client_per_round"),
    "client_s": lambda s: s.get("client_seconds_per_round"),
    "wall_s": lambda s: s.get("wall_seconds"),
}

# The rows of the paper's Table I: (key, title, task, metric, higher is better).
ROWS = [
    ("accuracy", "Model accuracy (final test accuracy)", "classify", "final_acc", True),
    ("comm_classify", "Communication, classification (MB per client per round)", "classify", "mb", False),
    ("comm_generate", "Communication, generation (MB per client per round)", "generate", "mb", False),
    ("compute", "Client computation (GFLOPs per client per round)", "classify", "gflops", False),
]
# Table I's stars turned into ranks, 1 = best (most accurate, least traffic, least compute).
PAPER_RANK = {
    "accuracy": {"fedavg": 1, "split": 2, "kd": 3},
    "comm_classify": {"kd": 1, "fedavg": 2, "split": 3},
    "comm_generate": {"fedavg": 1, "split": 2, "kd": 3},
    "compute": {"split": 1, "fedavg": 2, "kd": 3},
}
# The paper's qualitative claims, checked against the measured ranks: (text, row, framework, best/worst).
CLAIMS = [
    ("FedLLM is the most accurate", "accuracy", "fedavg", "best"),
    ("Split-FedLLM has the lowest client compute", "compute", "split", "best"),
    ("Split-FedLLM has the highest traffic (classification)", "comm_classify", "split", "worst"),
    ("KD-FedLLM has the cheapest traffic on classification", "comm_classify", "kd", "best"),
    ("KD-FedLLM has the most expensive traffic on generation", "comm_generate", "kd", "worst"),
    ("KD-FedLLM has the highest client compute", "compute", "kd", "worst"),
]


def _add(a, b):
    return None if a is None or b is None else a + b


@dataclass
class Run:
    path: Path
    cfg: dict[str, Any]  # flat "section.key" config, defaults filled in
    summary: dict[str, Any] | None  # None: the run did not finish
    rounds: list[dict[str, Any]]  # metrics.per_round rows
    failed: bool = False

    @property
    def framework(self) -> str:
        return self.cfg["framework"]

    @property
    def task(self) -> str:
        return self.cfg["train.task"]


@dataclass
class Setting:
    """One (framework, task, swept values) cell, over its seeds."""

    framework: str
    task: str
    values: dict[str, Any]
    runs: list[Run]
    stats: dict[str, tuple[float, float]]  # metric -> (mean, std) over seeds

    @property
    def label(self) -> str:
        # With several swept keys, those at their default say nothing (prox_mu=0.0 beside
        # strategy=fedadam): only the first swept key is always shown.
        shown = [(k, v) for i, (k, v) in enumerate(self.values.items())
                 if i == 0 or len(self.values) == 1 or v != DEFAULTS.get(k)]
        return ", ".join(f"{SHORT.get(k, k.split('.')[-1])}={v}" for k, v in shown) or "default"

    def curve(self) -> list[tuple[int, float, float]]:
        """(round, mean, std) of the test accuracy over seeds."""
        by_round: dict[int, list[float]] = defaultdict(list)
        for run in self.runs:
            for row in run.rounds:
                if row["test_accuracy"] is not None:
                    by_round[row["round"]].append(row["test_accuracy"])
        return [(rnd, *mean_std(accs)) for rnd, accs in sorted(by_round.items())]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); one value has std 0."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(root: str | Path) -> list[Run]:
    root = Path(root)
    if not root.is_dir():
        raise FedtuneError(f"{root}: not a directory")
    defaults = configlib.flat_dict(configlib.RunConfig())
    runs = []
    for cfg_path in sorted(root.rglob(CONFIG)):
        path = cfg_path.parent
        cfg = {**defaults, **configlib.read_file(cfg_path)}
        summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else None
        records = []
        if (path / METRICS).is_file():
            records = [json.loads(line) for line in (path / METRICS).read_text().splitlines() if line.strip()]
        runs.append(Run(path, cfg, summary, per_round(records), (path / ERROR).is_file()))
    return runs


def _sort_key(values: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)) for v in values)


def aggregate(runs: list[Run]) -> list[Setting]:
    """Completed runs grouped by (framework, task, swept values), with mean/std over seeds."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.summary is not None:
            groups[(run.framework, run.task)].append(run)
    settings = []
    order = {fw: i for i, fw in enumerate(FRAMEWORKS)}
    for (fw, task), group in sorted(groups.items(), key=lambda kv: (kv[0][1] != "classify", order.get(kv[0][0], 9), kv[0])):
        swept = [k for k in group[0].cfg if k not in NOT_SWEPT and len({repr(r.cfg.get(k)) for r in group}) > 1]
        cells: dict[tuple, list[Run]] = defaultdict(list)
        for run in group:
            # list values (model.client_ranks, split.client_profiles) as tuples, so they can key a cell
            cells[tuple(_hashable(run.cfg.get(k)) for k in swept)].append(run)
        for values in sorted(cells, key=_sort_key):
            cell = cells[values]
            stats = {}
            for name, get in METRICS_OF_RUN.items():
                xs = [get(r.summary) for r in cell]
                if all(x is not None for x in xs):
                    stats[name] = mean_std(xs)
            settings.append(Setting(fw, task, dict(zip(swept, values)), cell, stats))
    return settings


def framework_figure(settings: list[Setting], fw: str, task: str, metric: str) -> float | None:
    """A framework's figure for one Table I row: the mean over its swept settings of the
    per-setting means over seeds."""
    xs = [s.stats[metric][0] for s in settings if s.framework == fw and s.task == task and metric in s.stats]
    return statistics.fmean(xs) if xs else None


def ranking(settings: list[Setting]) -> dict[str, dict[str, tuple[float, int]]]:
    """row -> framework -> (figure, rank among the measured frameworks; 1 = best)."""
    table = {}
    for key, _, task, metric, higher_better in ROWS:
        figures = {fw: framework_figure(settings, fw, task, metric) for fw in FRAMEWORKS}
        figures = {fw: x for fw, x in figures.items() if x is not None}
        ordered = sorted(figures.values(), reverse=higher_better)
        table[key] = {fw: (x, ordered.index(x) + 1) for fw, x in figures.items()}
    return table


def check_claims(table: dict[str, dict[str, tuple[float, int]]]) -> list[tuple[str, str, str]]:
    """-> (claim, verdict, the measured figures) with verdict "agrees", "disagrees" or "not measured"."""
    out = []
    for text, row, fw, side in CLAIMS:
        cells = table[row]
        metric = next(r for r in ROWS if r[0] == row)[3]
        detail = ", ".join(f"{f} {_fmt(metric, x)}" for f, (x, _) in sorted(cells.items(), key=lambda kv: kv[1][1]))
        if fw not in cells or len(cells) < 2:
            out.append((text, "not measured", detail or "no runs"))
            continue
        rank = cells[fw][1]
        holds = rank == 1 if side == "best" else rank == max(r for _, r in cells.values())
        tied = sum(r == rank for _, r in cells.values()) > 1
        out.append((text, ("agrees" if holds else "disagrees") + (" (tied)" if tied and holds else ""), detail))
    return out


def _fmt(metric: str, x: float | None, std: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if metric.endswith("acc"):
        text = f"{100 * x:.1f}%"
        return text if std is None else f"{100 * x:.1f} ± {100 * std:.1f}%"
    spec = ",.0f" if abs(x) >= 1000 else ".3g"  # no exponents: 1,400 rather than 1.4e+03
    return format(x, spec) if std is None else f"{format(x, spec)} ± {format(std, spec if std >= 1000 else '.2g')}"


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _by_framework(settings: list[Setting], task: str = "classify") -> dict[str, list[Setting]]:
    out: dict[str, list[Setting]] = defaultdict(list)
    for s in settings:
        if s.task == task:
            out[s.framework].append(s)
    return dict(out)


def _axis_label(group: list[Setting]) -> str:
    keys = list(group[0].values)
    return AXIS.get(keys[0], keys[0]) if len(keys) == 1 else "setting" if keys else ""


def _tick(s: Setting) -> str:
    return str(next(iter(s.values.values()))) if len(s.values) == 1 else s.label


def plot_accuracy(settings: list[Setting], path: Path) -> bool:
    """Like the paper's Fig. 3: final accuracy per swept value, one panel per framework."""
    plt = _plt()
    groups = {fw: [s for s in g if "final_acc" in s.stats] for fw, g in _by_framework(settings).items()}
    groups = {fw: g for fw, g in groups.items() if g}
    if not groups:
        return False
    ticks = {fw: [re.sub(r", (?=[\w.]+=)", ",\n", _tick(s)) for s in g] for fw, g in groups.items()}  # a pair a line
    lines = [line for t in ticks.values() for tick in t for line in tick.split("\n")]
    slanted = max(map(len, lines)) > 8  # long setting names would overlap side by side
    width = max(4.2, 0.8 * max(len(g) for g in groups.values()) + 1.5)
    height = 3.8 + (0.07 * max(map(len, lines)) + 0.15 * max(t.count("\n") for t in ticks[next(iter(ticks))]) if slanted else 0)
    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups), height), sharey=True, squeeze=False)
    for ax, (fw, group) in zip(axes[0], groups.items()):
        means = [100 * s.stats["final_acc"][0] for s in group]
        stds = [100 * s.stats["final_acc"][1] for s in group]
        x = range(len(group))
        ax.bar(x, means, yerr=stds, capsize=4, width=0.6, color=COLORS.get(fw, "gray"), alpha=0.85)
        for xi, m in zip(x, means):
            ax.annotate(f"{m:.1f}", (xi, m), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xticks(list(x), ticks[fw], rotation=30 if slanted else 0, ha="right" if slanted else "center",
                      fontsize=8 if slanted else None)
        ax.set_xlabel(_axis_label(group))
        ax.set_title(TITLES.get(fw, fw))
    axes[0][0].set_ylabel("final test accuracy (%)")
    top = max(sum(s.stats["final_acc"]) for g in groups.values() for s in g)
    axes[0][0].set_ylim(0, min(100, 100 * top * 1.2 + 2))
    counts = {len(s.runs) for g in groups.values() for s in g}
    seeds = f"{max(counts)} seed{'s' if max(counts) > 1 else ''}" if len(counts) == 1 else f"{min(counts)} to {max(counts)} seeds"
    spread = "one seed" if counts == {1} else f"mean ± std over {seeds}"
    fig.suptitle(f"Final test accuracy\n({spread})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _log_decades(ax, values: list[float]) -> None:
    """A log axis spanning whole decades, so that bar heights compare honestly."""
    values = [v for v in values if v > 0]
    ax.set_yscale("log")
    if values:
        ax.set_ylim(10 ** math.floor(math.log10(min(values))), 10 ** math.ceil(math.log10(max(values) * 1.5)))


def plot_costs(settings: list[Setting], path: Path) -> bool:
    """Like the paper's Fig. 4: traffic (log axis) and client compute per client per round."""
    plt = _plt()
    from matplotlib.patches import Patch

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(settings) + 2), 6.5), sharex=True)
    x = list(range(len(settings)))
    colors = [COLORS.get(s.framework, "gray") for s in settings]
    hatches = ["//" if s.task != "classify" else "" for s in settings]
    for ax, metric, label in ((top, "mb", "MB per client per round\n(up + down, log scale)"),
                              (bottom, "gflops", "client GFLOPs per round")):
        vals = [s.stats.get(metric, (math.nan, 0.0)) for s in settings]
        bars = ax.bar(x, [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=3, width=0.6, color=colors, alpha=0.85)
        for bar, hatch, v in zip(bars, hatches, vals):
            bar.set_hatch(hatch)
            ax.annotate(_fmt(metric, v[0]), (bar.get_x() + bar.get_width() / 2, v[0]), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=7)
        ax.set_ylabel(label)
    _log_decades(top, [s.stats["mb"][0] for s in settings if "mb" in s.stats])
    gflops = [s.stats["gflops"][0] for s in settings if "gflops" in s.stats and s.stats["gflops"][0] > 0]
    if gflops and max(gflops) / min(gflops) > 100:  # a linear axis would hide the small ones
        _log_decades(bottom, gflops)
        bottom.set_ylabel("client GFLOPs per round\n(log scale)")
    else:
        bottom.set_ylim(0, max(gflops or [1]) * 1.15)
    ticks = [(s.label if s.values else s.framework) + (" (gen)" if s.task != "classify" else "") for s in settings]
    bottom.set_xticks(x, ticks, rotation=45, ha="right")
    legend = [Patch(color=COLORS[fw], label=TITLES[fw]) for fw in FRAMEWORKS if any(s.framework == fw for s in settings)]
    if any(s.task != "classify" for s in settings):
        legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="generation task"))
    top.legend(handles=legend, fontsize=8, loc="best")
    top.set_title("Per-client communication and computation per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_curves(settings: list[Setting], path: Path) -> bool:
    """Test accuracy per round, mean over seeds with a ±std band, one panel per framework."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    groups = _by_framework(settings)
    if not groups:
        return False
    wide = max(len(g) for g in groups.values()) > 4  # legends beside the panels
    fig, axes = plt.subplots(1, len(groups), figsize=((7.5 if wide else 4.2) * len(groups), 3.6 + 0.6 * wide),
                             sharey=True, squeeze=False)
    for ax, (fw, group) in zip(axes[0], groups.items()):
        for s in group:
            curve = s.curve()
            rounds = [c[0] for c in curve]
            mean = [100 * c[1] for c in curve]
            std = [100 * c[2] for c in curve]
            (line,) = ax.plot(rounds, mean, marker="o", markersize=3, label=s.label)
            ax.fill_between(rounds, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(TITLES.get(fw, fw))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        outside = dict(loc="upper left", bbox_to_anchor=(1.02, 1)) if len(group) > 4 else {}  # keep the curves visible
        ax.legend(fontsize=8, title=_axis_label(group) if len(group) > 1 else None, title_fontsize=8, **outside)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle("Test accuracy per round (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_traffic(settings: list[Setting], path: Path) -> bool:
    """Final accuracy against traffic (MB per client per round, up + down), one point per
    setting with mean ± std over seeds on both axes and its swept values as the label: what
    each setting's accuracy costs on the wire, whatever key was varied."""
    plt = _plt()
    from matplotlib.lines import Line2D

    points = [s for s in settings if s.task == "classify" and "final_acc" in s.stats and "mb" in s.stats]
    if len(points) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    placed: list[tuple[float, float]] = []
    for s in points:
        (x, dx), (y, dy) = s.stats["mb"], s.stats["final_acc"]
        ax.errorbar(x, 100 * y, xerr=dx, yerr=100 * dy, fmt="o", capsize=3, color=COLORS.get(s.framework, "gray"))
        # Settings that land on (nearly) the same point get their labels stacked, not overprinted.
        near = sum(abs(px - x) <= 0.02 * max(x, 1e-9) and abs(py - 100 * y) < 1.5 for px, py in placed)
        placed.append((x, 100 * y))
        ax.annotate(s.label if s.values else s.framework, (x, 100 * y), textcoords="offset points",
                    xytext=(6, 4 - 10 * near), fontsize=7)
    xs = [s.stats["mb"][0] for s in points]
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, max(xs) * 1.35)  # room for the labels; from zero so distances compare honestly
    ax.set_xlabel("MB per client per round (up + down)")
    ax.set_ylabel("final test accuracy (%)")
    frameworks = [fw for fw in FRAMEWORKS if any(s.framework == fw for s in points)]
    ax.legend(handles=[Line2D([], [], marker="o", ls="", color=COLORS[fw], label=TITLES[fw]) for fw in frameworks],
              fontsize=8, loc="best")
    counts = {len(s.runs) for s in points}
    ax.set_title(f"Final test accuracy against traffic (mean ± std over {min(counts)}"
                 f"{'' if len(counts) == 1 else f' to {max(counts)}'} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- report.md

FIGURES = {"fig3_accuracy.png": plot_accuracy, "fig4_costs.png": plot_costs, "accuracy_curves.png": plot_curves,
           "accuracy_vs_traffic.png": plot_accuracy_traffic}


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _unfinished(runs: list[Run]) -> str:
    unfinished = [r for r in runs if r.summary is None]
    if not unfinished:
        return ""
    return f" ({len(unfinished)} unfinished, {sum(r.failed for r in unfinished)} of them failed: listed at the end)"


def markdown(root: Path, runs: list[Run], settings: list[Setting], figures: list[str]) -> str:
    table = ranking(settings)
    complete = [r for r in runs if r.summary is not None]
    models = sorted({str(r.cfg["model.name"]) for r in complete})
    rounds = sorted({r.cfg["fed.rounds"] for r in complete})
    seeds = sorted({r.cfg["seed"] for r in complete})
    out = [
        f"# fedtune sweep report: `{root}`",
        "",
        f"{len(complete)} completed runs{_unfinished(runs)} · model {', '.join(models)} · rounds {', '.join(map(str, rounds))} "
        f"· seeds {', '.join(map(str, seeds))}. Every figure is a mean over seeds (± sample standard deviation); "
        "traffic is the serialized bytes each client sent plus received per round, compute is the client's "
        "analytic FLOPs per round.",
        "",
        "## Ranking in the form of the paper's Table I",
        "",
        "Each cell: the framework's figure (its mean over the swept settings) and its rank among the measured "
        "frameworks, rank 1 = best (highest accuracy, least traffic, least client compute); in brackets the rank "
        "the paper's Table I gives (-: a framework the paper did not compare).",
        "",
    ]
    # The paper's three frameworks always, any other registered one where it was measured.
    columns = [fw for fw in FRAMEWORKS if fw in PAPER_RANK["accuracy"] or any(s.framework == fw for s in settings)]
    rows = []
    for key, title, task, metric, _ in ROWS:
        cells = []
        for fw in columns:
            paper = PAPER_RANK[key].get(fw, "-")  # "-": a framework the paper did not compare
            if fw in table[key]:
                x, rank = table[key][fw]
                cells.append(f"{_fmt(metric, x)} · **{rank}** ({paper})")
            else:
                cells.append(f"not measured ({paper})")
        rows.append([title] + cells)
    out += [_md_table(["metric"] + [TITLES[fw] for fw in columns], rows), ""]

    out += ["## Where the measurements agree with the paper", ""]
    for text, verdict, detail in check_claims(table):
        out.append(f"- **{verdict}**: {text} (measured: {detail}).")
    for key, title, *_ in ROWS:
        measured = sorted(table[key], key=lambda fw: table[key][fw][1])
        paper = [fw for fw in sorted(PAPER_RANK[key], key=PAPER_RANK[key].get) if fw in table[key]]
        if len(measured) >= 2:
            # Frameworks the paper did not compare are listed but do not count against its order.
            same = "the same as" if [fw for fw in measured if fw in PAPER_RANK[key]] == paper else "unlike"
            out.append(f"- {title}, best first: measured {', '.join(measured)}; {same} the paper's {', '.join(paper)}.")
    out.append("")

    out += ["## Figures", ""]
    out += [f"![{name}]({name})" for name in figures] + [""]

    out += ["## Results per setting", ""]
    header = ["setting", "seeds", "final acc", "best acc", "MB up", "MB down", "MB/client/round",
              "GFLOPs/client/round", "client s/round", "wall s"]
    metrics = ["final_acc", "best_acc", "mb_up", "mb_down", "mb", "gflops", "client_s", "wall_s"]
    for fw in FRAMEWORKS + tuple(sorted({s.framework for s in settings} - set(FRAMEWORKS))):
        for task in TASKS:
            group = [s for s in settings if s.framework == fw and s.task == task]
            if not group:
                continue
            out += [f"### {TITLES.get(fw, fw)}, {TASKS[task]}", ""]
            rows = [[s.label, str(len(s.runs))] + [_fmt(m, *s.stats[m]) if m in s.stats else "-" for m in metrics]
                    for s in group]
            out += [_md_table(header, rows), ""]

    unfinished = [r for r in runs if r.summary is None]
    if unfinished:
        out += ["## Unfinished or failed runs (left out above)", ""]
        out += [f"- `{r.path}`" + (" (failed: see error.txt)" if r.failed else "") for r in unfinished] + [""]
    return "\n".join(out)


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Aggregate the runs under ``root``; write report.md, report.json and the figures to ``out``."""
    root = Path(root)
    runs = load_runs(root)
    settings = aggregate(runs)
    if not settings:
        raise FedtuneError(f"{root}: no completed runs (no run directory with a {SUMMARY})")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    figures = [name for name, plot in FIGURES.items() if plot(settings, out / name)]
    data = {
        "settings": [{"framework": s.framework, "task": s.task, "values": s.values, "seeds": [r.cfg["seed"] for r in s.runs],
                      "runs": [str(r.path) for r in s.runs], "stats": s.stats} for s in settings],
        "ranking": ranking(settings),
        "claims": check_claims(ranking(settings)),
    }
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    path = out / "report.md"
    path.write_text(markdown(root, runs, settings, figures))
    return path


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value
