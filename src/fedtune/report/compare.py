"""The comparison a reviewer reads: one entry per method (a grid of the experiment, or a
setting), its test figure per seed with mean and 95% interval, the point a method's grid chose
on validation (``select = "val"``), and paired differences against the named baseline.

An entry's figure per seed is the run's final test figure (the task's metric, on the full test
set: evalsets.py). Under ``select = "val"`` each grid of the experiment is one method and its
varied keys are that method's candidate hyperparameters: the report scores each candidate by
the mean over its seeds of the validation metric (``select_round = "final"``: the last round's;
``"best"``: each run's best round), keeps the highest (the first in grid order on a tie), and
shows only the chosen candidate's test figure (``"best"``: the test figure of the round where
that run's validation metric peaked, measured on the rows that round used). Test records play no
part in the choice."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as configlib
from ..errors import FedtuneError
from ..sweep import Design, best_candidate, check_design, val_score
from .load import Run, Setting
from .names import MAIN_TASK
from .stats import Interval, paired, t_interval, verdict

EXPERIMENT = "experiment.toml"  # the copy of the experiment file a sweep writes into its out
POINT = re.compile(r"^(?P<grid>[^_].*?)(?:__(?P<point>.+))?__seed(?P<seed>-?\d+)$")


@dataclass
class Entry:
    name: str
    runs: dict[int, Run]  # seed -> run
    test: dict[int, float]  # seed -> the figure compared
    note: str = ""  # how the point was chosen (select = "val")
    interval: Interval | None = None
    diff: Interval | None = None
    conclusion: str = ""


def read_design(root: Path) -> Design:
    path = root / EXPERIMENT
    if not path.is_file():
        return Design()
    head = configlib.read_tree(path).get("sweep", {})
    return check_design(head if isinstance(head, dict) else {}, str(path))


def val_figure(run: Run, select_round: str) -> tuple[float, int] | None:
    """(the run's validation metric, the round it was read at), or None without validation rows."""
    return val_score(run.rounds, select_round)


def test_figure(run: Run, rnd: int | None = None) -> float | None:
    """The final test figure, or the test figure of round ``rnd``."""
    if rnd is None:
        return run.summary.get("final_test_accuracy")
    return next((r["test_accuracy"] for r in run.rounds if r["round"] == rnd), None)


def points(runs: list[Run]) -> dict[str, dict[str, dict[int, Run]]] | None:
    """Completed runs of a sweep by grid, then point (its directory name without the seed), then
    seed; None when some run's directory is not named as a sweep names its points."""
    out: dict[str, dict[str, dict[int, Run]]] = {}
    for run in runs:
        match = POINT.match(run.path.name)
        if not match:
            return None
        if run.summary is not None:
            point = match["point"] or ""
            out.setdefault(match["grid"], {}).setdefault(point, {})[int(match["seed"])] = run
    return out


def select_point(grid: str, candidates: dict[str, dict[int, Run]], select_round: str,
                 select_seeds: list[int] | None = None) -> Entry:
    """The candidate with the highest mean validation metric over its seeds (over select_seeds
    alone when given: the other seeds ran the chosen candidate only)."""
    scores: dict[str, list[float]] = {}
    for point, seeds in candidates.items():
        figures = [val_figure(run, select_round) for s, run in seeds.items() if not select_seeds or s in select_seeds]
        if not figures:  # no run on the selection seeds yet
            continue
        if any(f is None for f in figures):
            raise FedtuneError(f"select = \"val\": {grid} {point or '(its one point)'} has no validation "
                               "records; set data.val_size > 0 in the experiment")
        scores[point] = [f[0] for f in figures]
    chosen = best_candidate(scores)
    means = {p: sum(v) / len(v) for p, v in scores.items()}
    seeds = candidates[chosen]
    rnd = (lambda run: val_figure(run, select_round)[1]) if select_round == "best" else (lambda run: None)
    test = {seed: test_figure(run, rnd(run)) for seed, run in seeds.items()}
    others = ", ".join(f"{p or 'default'} {100 * v:.1f}%" for p, v in means.items() if p != chosen)
    note = f"{chosen or 'default'} (mean val {100 * means[chosen]:.1f}%" + (f"; not chosen: {others})" if others else ")")
    return Entry(grid, seeds, test, note)


def entries(runs: list[Run], settings: list[Setting], design: Design) -> list[Entry]:
    """The units the comparison is about: each grid (select = "val") or each point of a sweep
    directory, else each setting of the report."""
    grids = points(runs) if design.from_file else None
    if grids is not None and design.select == "val":
        return [select_point(g, c, design.select_round, design.select_seeds) for g, c in grids.items()]
    if grids is not None:
        return [Entry(g if len(c) == 1 else f"{g} ({p or 'default'})", seeds,
                      {s: test_figure(r) for s, r in seeds.items()})
                for g, c in grids.items() for p, seeds in c.items()]
    if design.select == "val":
        raise FedtuneError("select = \"val\" needs the runs of a sweep (directories named <grid>__...__seed<N>)")
    out = []
    for s in settings:
        name = s.framework + (f" ({s.label})" if s.values else "") + ("" if s.task == MAIN_TASK else f" [{s.task}]")
        seeds = {int(r.cfg["seed"]): r for r in s.runs}
        out.append(Entry(name, seeds, {seed: test_figure(r) for seed, r in seeds.items()}))
    return out


def compare(runs: list[Run], settings: list[Setting], design: Design, baseline: str = "") -> tuple[list[Entry], str]:
    """Entries with their intervals and, against the baseline, paired differences -> (entries,
    the baseline's name or "" when there is none)."""
    found = entries(runs, settings, design)
    for e in found:
        e.test = {s: v for s, v in e.test.items() if v is not None}
        e.interval = t_interval(list(e.test.values()))
    names = [e.name for e in found]
    base = baseline or design.baseline or ("fedavg" if "fedavg" in names else "")
    if base and base not in names:
        raise FedtuneError(f"baseline {base!r} is none of the compared entries: {', '.join(names)}")
    if base:
        ref = found[names.index(base)].test
        for e in found:
            if e.name != base:
                e.diff = paired(e.test, ref)
                e.conclusion = verdict(e.diff)
    return found, base


def pct(x: float, signed: bool = False) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def as_json(found: list[Entry], base: str, design: Design) -> dict[str, Any]:
    def iv(i: Interval | None):
        return None if i is None else {"n": i.n, "mean": i.mean, "low": i.low, "high": i.high}

    return {"select": design.select, "select_round": design.select_round if design.select else None,
            "select_seeds": design.select_seeds or None,
            "baseline": base or None,
            "entries": [{"name": e.name, "test": e.test, "runs": {s: str(r.path) for s, r in e.runs.items()},
                         "chosen": e.note or None, "interval": iv(e.interval), "paired_difference": iv(e.diff),
                         "conclusion": e.conclusion or None} for e in found]}
