"""Every run directory under a folder, read back and grouped by (framework, task, swept
values), with mean and standard deviation over seeds.

The swept values are found from the configs themselves: within one (framework, task) group,
the keys whose values differ between runs (other than the seed and where the run lives).
So the report needs nothing but the run directories, however they were produced.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as configlib
from ..errors import FedtuneError
from ..metrics import per_round
from ..rundir import CONFIG, METRICS, SUMMARY
from ..sweep import ERROR, NOT_IDENTITY
from .names import FRAMEWORKS, MAIN_TASK, SHORT

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
    for (fw, task), group in sorted(groups.items(), key=lambda kv: (kv[0][1] != MAIN_TASK, order.get(kv[0][0], 9), kv[0])):
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


def by_group(settings: list[Setting]) -> dict[tuple[str, str], list[Setting]]:
    """(framework, task) -> its settings, in the order ``aggregate`` gave them."""
    out: dict[tuple[str, str], list[Setting]] = defaultdict(list)
    for s in settings:
        out[(s.framework, s.task)].append(s)
    return dict(out)


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value
