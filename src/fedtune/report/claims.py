"""The paper's Table I and its qualitative claims, checked against a sweep's measured ranks."""

from __future__ import annotations

import statistics

from .load import Setting, by_group
from .names import FRAMEWORKS, fmt

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


def framework_figure(settings: list[Setting], fw: str, task: str, metric: str) -> float | None:
    """A framework's figure for one Table I row: the mean over its swept settings of the
    per-setting means over seeds."""
    xs = [s.stats[metric][0] for s in by_group(settings).get((fw, task), []) if metric in s.stats]
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
        detail = ", ".join(f"{f} {fmt(metric, x)}" for f, (x, _) in sorted(cells.items(), key=lambda kv: kv[1][1]))
        if fw not in cells or len(cells) < 2:
            out.append((text, "not measured", detail or "no runs"))
            continue
        rank = cells[fw][1]
        holds = rank == 1 if side == "best" else rank == max(r for _, r in cells.values())
        tied = sum(r == rank for _, r in cells.values()) > 1
        out.append((text, ("agrees" if holds else "disagrees") + (" (tied)" if tied and holds else ""), detail))
    return out
