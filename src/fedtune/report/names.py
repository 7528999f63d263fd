"""How the report names, colours and formats what it shows: the registries' titles for
frameworks and tasks, the axes of the swept keys, and numbers without exponents."""

from __future__ import annotations

import math

from ..frameworks import FRAMEWORKS as FRAMEWORK_REGISTRY
from ..tasks import TASKS as TASK_REGISTRY

FRAMEWORKS = FRAMEWORK_REGISTRY.names
TITLES = {fw: f"{FRAMEWORK_REGISTRY.title(fw)} ({fw})" for fw in FRAMEWORKS}
COLORS = {fw: f"C{i}" for i, fw in enumerate(FRAMEWORKS)}
TASKS = {task: TASK_REGISTRY.title(task) for task in TASK_REGISTRY.names}
# The task of the paper's Fig. 3 and most of its Table I: listed first, drawn plain; the
# report marks every other task (hatched bars, "(gen)").
MAIN_TASK = "classify"
AXIS = {"model.lora_r": "LoRA rank r", "data.public_size": "public set size (samples)",
        "split.samples_per_round": "training samples per client per round"}
SHORT = {"model.lora_r": "r", "data.public_size": "PD", "split.samples_per_round": "TS"}


def fmt(metric: str, x: float | None, std: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if metric.endswith("acc"):
        text = f"{100 * x:.1f}%"
        return text if std is None else f"{100 * x:.1f} ± {100 * std:.1f}%"
    spec = ",.0f" if abs(x) >= 1000 else ".3g"  # no exponents: 1,400 rather than 1.4e+03
    return format(x, spec) if std is None else f"{format(x, spec)} ± {format(std, spec if std >= 1000 else '.2g')}"


def seeds_phrase(counts: set[int]) -> str:
    """How many seeds a figure's points average: "one seed", "3 seeds", "2 to 3 seeds"."""
    low, high = min(counts), max(counts)
    if low != high:
        return f"{low} to {high} seeds"
    return "one seed" if high == 1 else f"{high} seeds"


def abbreviations(keys) -> str:
    """What the short names in tick labels stand for ("PD = public set size (samples)")."""
    return "; ".join(f"{SHORT[k]} = {AXIS[k]}" for k in sorted(set(keys)) if k in SHORT and SHORT[k] != "r")
