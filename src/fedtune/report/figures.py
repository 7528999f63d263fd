"""The report's figures: final accuracy per setting (like the paper's Fig. 3), traffic and
client compute (like its Fig. 4), accuracy per round, and accuracy against traffic. Each
writes one PNG and returns whether there was anything to draw."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from .load import Setting
from .names import AXIS, COLORS, FRAMEWORKS, MAIN_TASK, TITLES, abbreviations, fmt, seeds_phrase


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _by_framework(settings: list[Setting], task: str = MAIN_TASK) -> dict[str, list[Setting]]:
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
    spread = "one seed" if counts == {1} else f"mean ± std over {seeds_phrase(counts)}"
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
    hatches = ["//" if s.task != MAIN_TASK else "" for s in settings]
    for ax, metric, label in ((top, "mb", "MB per client per round\n(up + down, log scale)"),
                              (bottom, "gflops", "client GFLOPs per round")):
        vals = [s.stats.get(metric, (math.nan, 0.0)) for s in settings]
        bars = ax.bar(x, [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=3, width=0.6, color=colors, alpha=0.85)
        for bar, hatch, v in zip(bars, hatches, vals):
            bar.set_hatch(hatch)
            ax.annotate(fmt(metric, v[0]), (bar.get_x() + bar.get_width() / 2, v[0]), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=7)
        ax.set_ylabel(label)
    _log_decades(top, [s.stats["mb"][0] for s in settings if "mb" in s.stats])
    gflops = [s.stats["gflops"][0] for s in settings if "gflops" in s.stats and s.stats["gflops"][0] > 0]
    if gflops and max(gflops) / min(gflops) > 100:  # a linear axis would hide the small ones
        _log_decades(bottom, gflops)
        bottom.set_ylabel("client GFLOPs per round\n(log scale)")
    else:
        bottom.set_ylim(0, max(gflops or [1]) * 1.15)
    ticks = [(s.label if s.values else s.framework) + (" (gen)" if s.task != MAIN_TASK else "") for s in settings]
    bottom.set_xticks(x, ticks, rotation=45, ha="right")
    bottom.set_xlabel(abbreviations(k for s in settings for k in s.values))
    legend = [Patch(color=COLORS[fw], label=TITLES[fw]) for fw in FRAMEWORKS if fw in {s.framework for s in settings}]
    if any(s.task != MAIN_TASK for s in settings):
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

    points = [s for s in settings if s.task == MAIN_TASK and "final_acc" in s.stats and "mb" in s.stats]
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
    frameworks = [fw for fw in FRAMEWORKS if fw in {s.framework for s in points}]
    ax.legend(handles=[Line2D([], [], marker="o", ls="", color=COLORS[fw], label=TITLES[fw]) for fw in frameworks],
              fontsize=8, loc="best")
    counts = {len(s.runs) for s in points}
    spread = "one seed" if counts == {1} else f"mean ± std over {seeds_phrase(counts)}"
    ax.set_title(f"Final test accuracy against traffic ({spread})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# file name -> what draws it, in the order report.md shows them
FIGURES = {"fig3_accuracy.png": plot_accuracy, "fig4_costs.png": plot_costs, "accuracy_curves.png": plot_curves,
           "accuracy_vs_traffic.png": plot_accuracy_traffic}
