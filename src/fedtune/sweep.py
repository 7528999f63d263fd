"""Sweeps: a grid over any config keys x seeds, each point a normal run directory.

An experiment file (TOML) holds a base config and one or more sub-grids:

    [sweep]
    preset = "demo"            # the preset every point starts from
    seeds = [0, 1]             # default: the preset's / base config's `seeds`
    out = "runs/sweep-cpu"     # default: runs/sweep-<file stem>

    [base.model]               # config sections applied to every point
    name = "minilm"

    [[grid]]
    name = "fedavg"                                  # default: the grid's framework
    set = { framework = "fedavg" }                   # fixed keys for this sub-grid
    vary = { "model.lora_r" = [1, 2, 4, 8, 16] }     # cartesian product over these lists

A point's directory is ``<out>/<grid>__<key>-<value>...__seed<seed>``. Points with a
``summary.json`` are done and skipped; a started point resumes from its checkpoint (or starts
over if the experiment changed its config); a point that raised leaves its traceback in
``error.txt`` and the sweep goes on to the next point.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as configlib
from . import precision
from .errors import FedtuneError
from .console import Progress, RichProgress
from .rundir import CONFIG, METRICS, SUMMARY, RunDir

ERROR = "error.txt"
GRID_KEYS = {"name", "set", "vary", "seeds"}
SWEEP_KEYS = {"preset", "seeds", "out", "select", "select_round", "select_seeds", "baseline"}
SELECT_KEYS = {"select": ("val",), "select_round": ("final", "best")}
# Keys that may differ between the saved config of a started point and the experiment
# without making it a different point (where it lives, how many threads ran it).
NOT_IDENTITY = {"out", "seeds", "train.threads", "train.device"}


@dataclass
class Point:
    name: str  # directory name under the sweep's out
    grid: str
    values: dict[str, Any]  # the varied keys at this point
    seed: int
    cfg: configlib.RunConfig


@dataclass
class Design:
    """What an experiment file's [sweep] says about the report's comparison (report/compare.py)."""

    select: str = ""  # "val": each grid's point is picked on the validation rows
    select_round: str = "final"  # "final": the last round's validation metric; "best": each run's best round
    baseline: str = ""  # the entry paired differences are taken against
    from_file: bool = False  # read from an experiment file (a sweep's points), not made up
    # Seeds the choice is made on; the other seeds run the chosen point only (none: every seed, every point).
    select_seeds: list[int] = field(default_factory=list)


def check_design(head: dict[str, Any], where: str) -> Design:
    """[sweep]'s comparison keys, checked."""
    for key, allowed in SELECT_KEYS.items():
        if key in head and head[key] not in allowed:
            raise FedtuneError(f"{where}: [sweep] {key} must be one of {', '.join(map(repr, allowed))}; got {head[key]!r}")
    if "baseline" in head and not isinstance(head["baseline"], str):
        raise FedtuneError(f"{where}: [sweep] baseline must be a grid name (a string)")
    seeds = head.get("select_seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise FedtuneError(f"{where}: [sweep] select_seeds must be a list of integers (the seeds the choice is made on)")
    if seeds and head.get("select") != "val":
        raise FedtuneError(f"{where}: [sweep] select_seeds needs select = \"val\"")
    return Design(head.get("select", ""), head.get("select_round", "final"), head.get("baseline", ""), True, seeds)


def val_score(rounds: list[dict[str, Any]], select_round: str) -> tuple[float, int] | None:
    """(a run's validation metric, the round it was read at) from its per-round rows, or None
    without validation rows. "final": the last validated round; "best": the best (first on a tie)."""
    rows = [r for r in rounds if r.get("val_accuracy") is not None]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["val_accuracy"]) if select_round == "best" else rows[-1]
    return row["val_accuracy"], row["round"]


@dataclass
class Experiment:
    path: Path
    out: Path
    points: list[Point]
    design: Design = field(default_factory=Design)  # what [sweep] says about selection and the baseline
    all_points: list[Point] = field(default_factory=list)  # every point, whatever `points` is narrowed to


@dataclass
class SweepResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # select_seeds: their grid's choice is not made yet


def _value_text(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def _point_name(grid: str, values: dict[str, Any], seed: int) -> str:
    # The key's last part is enough unless two varied keys share it (e.g. kd.x and split.x).
    last = [k.split(".")[-1] for k in values]
    parts = [grid]
    for key, value in values.items():
        short = key.split(".")[-1] if last.count(key.split(".")[-1]) == 1 else key
        parts.append(f"{short}-{_value_text(value)}")
    return "__".join(parts + [f"seed{seed}"])


def _table(tree: dict, key: str, where: str) -> dict:
    value = tree.get(key, {})
    if not isinstance(value, dict):
        raise FedtuneError(f"{where}: '{key}' must be a table")
    return value


def load(path: str | Path, out: str | Path | None = None) -> Experiment:
    """Read an experiment file and expand it into points (every config is built and
    validated here, so a typo fails before anything runs)."""
    path = Path(path)
    tree = read_experiment(path)
    head = _table(tree, "sweep", str(path))
    preset = head.get("preset", "demo")
    base = configlib.flatten(_table(tree, "base", str(path)))
    base_cfg = configlib.build_config(preset, None, base)
    out = Path(out or head.get("out") or f"runs/sweep-{path.stem}")
    grids = tree.get("grid") or [{}]
    if not isinstance(grids, list):
        raise FedtuneError(f"{path}: 'grid' must be an array of tables ([[grid]])")
    points: list[Point] = []
    for i, grid in enumerate(grids, 1):
        name, fixed, vary, seeds = read_grid(grid, f"{path}: grid {i}", base_cfg, head.get("seeds", base_cfg.seeds))
        if any(p.grid == name for p in points):
            raise FedtuneError(f"{path}: grid {i}: grid name {name!r} is used twice; give each grid its own name")
        points += grid_points(name, fixed, vary, seeds, preset, base, out, f"{path}: grid {i}")
    design = check_design(head, str(path))
    check_selection(design, points, str(path))
    return Experiment(path, out, points, design, list(points))


def check_selection(design: Design, points: list[Point], where: str) -> None:
    """select = "val" needs validation rows at every point; the baseline must be a grid."""
    if design.select == "val":
        bare = sorted({p.grid for p in points if not p.cfg.data.val_size})
        if bare:
            raise FedtuneError(f"{where}: select = \"val\" picks on validation rows, but grid(s) {', '.join(bare)} "
                               "hold none: set data.val_size > 0 (e.g. in [base.data])")
    unknown = sorted(set(design.select_seeds) - {p.seed for p in points})
    if unknown:
        raise FedtuneError(f"{where}: select_seeds {', '.join(map(str, unknown))} are not seeds of the sweep")
    grids = {p.grid for p in points}
    if design.baseline and design.baseline.split(" (")[0] not in grids:
        raise FedtuneError(f"{where}: baseline {design.baseline!r} is not a grid; grids: {', '.join(sorted(grids))}")


def read_experiment(path: Path) -> dict[str, Any]:
    """The experiment file's tables, with unknown tables and [sweep] keys refused."""
    tree = configlib.read_tree(path)
    unknown = set(tree) - {"sweep", "base", "grid"}
    if unknown:
        raise FedtuneError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; expected sweep, base, grid")
    bad = set(_table(tree, "sweep", str(path))) - SWEEP_KEYS
    if bad:
        raise FedtuneError(f"{path}: unknown [sweep] key(s) {', '.join(sorted(bad))}; expected {', '.join(sorted(SWEEP_KEYS))}")
    return tree


def read_grid(grid: dict, where: str, base_cfg: configlib.RunConfig, default_seeds: list[int]):
    """One [[grid]] table -> (name, fixed keys, varied keys with their lists, seeds)."""
    bad = set(grid) - GRID_KEYS
    if bad:
        raise FedtuneError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; expected {', '.join(sorted(GRID_KEYS))}")
    fixed = configlib.flatten(_table(grid, "set", where))
    vary = configlib.flatten(_table(grid, "vary", where))
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise FedtuneError(f"{where}: vary.{key} must be a non-empty list of values")
    seeds = grid.get("seeds", default_seeds)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise FedtuneError(f"{where}: seeds must be a non-empty list of integers")
    name = str(grid.get("name") or fixed.get("framework") or base_cfg.framework)
    return name, fixed, vary, seeds


def grid_points(name: str, fixed: dict, vary: dict, seeds: list[int], preset: str, base: dict, out: Path,
                where: str) -> list[Point]:
    """The cartesian product of the varied keys x seeds, each a validated config."""
    points = []
    for combo in itertools.product(*vary.values()):
        values = dict(zip(vary, combo))
        for seed in seeds:
            pname = _point_name(name, values, seed)
            overrides = {**base, **fixed, **values, "seed": seed, "out": str(out / pname)}
            try:
                cfg = configlib.build_config(preset, None, overrides)
            except FedtuneError as exc:
                raise FedtuneError(f"{where}: {exc}") from None
            points.append(Point(pname, name, values, seed, cfg))
    return points


def _identity(cfg: configlib.RunConfig) -> dict[str, Any]:
    precision.resolve(cfg)  # "auto" is the choice config.toml records for it
    flat = configlib.flat_dict(cfg)
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY}


def changed_keys(point: Point) -> list[str]:
    """Keys where the run already in the point's directory differs from the experiment."""
    path = Path(point.cfg.out)
    if not (path / CONFIG).is_file():
        return []
    saved = _identity(RunDir.open(path)[1])
    return [k for k, v in _identity(point.cfg).items() if saved.get(k) != v]


def _server_rows(path: Path) -> list[dict[str, Any]]:
    lines = (path / METRICS).read_text().splitlines() if (path / METRICS).is_file() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("client") == "server"]


def best_candidate(scores: dict[str, list[float]]) -> str:
    """The candidate with the highest mean score, the first in order on a tie (the sweep's choice
    and the report's: report/compare.py)."""
    order = list(scores)
    return max(order, key=lambda k: (sum(scores[k]) / len(scores[k]), -order.index(k)))


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def chosen_values(candidates: list[Point], select_round: str) -> dict[str, Any] | None:
    """The varied values of the candidate with the highest mean validation metric over its seeds
    (the first in the grid's order on a tie); None while one of the candidates is unfinished."""
    scores: dict[str, list[float]] = {}
    for p in candidates:
        path = Path(p.cfg.out)
        if not (path / SUMMARY).is_file():
            return None
        score = val_score(_server_rows(path), select_round)
        if score is None:
            raise FedtuneError(f"select = \"val\": {path} has no validation records; set data.val_size > 0")
        scores.setdefault(_key(p.values), []).append(score[0])
    return json.loads(best_candidate(scores))


def selection_state(exp: Experiment, point: Point) -> str:
    """"run", "not chosen" or "waiting": under select_seeds a point on another seed runs only
    after its grid's choice is made on the selection seeds, and only if it is the chosen one."""
    seeds = exp.design.select_seeds
    if not seeds or point.seed in seeds:
        return "run"
    candidates = [p for p in exp.all_points if p.grid == point.grid and p.seed in seeds]
    if len({_key(p.values) for p in candidates}) <= 1:
        return "run"
    chosen = chosen_values(candidates, exp.design.select_round)
    if chosen is None:
        return "waiting"
    return "run" if _key(point.values) == _key(chosen) else "not chosen"


def run_point(point: Point, progress: Progress | None = None) -> tuple[str, dict[str, Any]]:
    """Run, resume or skip one point -> (what happened: "done"/"skipped", its summary)."""
    from .runtimes import run

    path = Path(point.cfg.out)
    if (path / SUMMARY).is_file():
        return "skipped", json.loads((path / SUMMARY).read_text())
    if changed_keys(point):  # an unfinished run of an edited experiment: start it over
        shutil.rmtree(path)
    (path / ERROR).unlink(missing_ok=True)
    if (path / CONFIG).is_file():
        return "done", run(point.cfg, RunDir(path), progress, resume=True)
    return "done", run(point.cfg, RunDir.create(point.cfg), progress)


class SweepProgress(RichProgress):
    """One live display for the whole sweep: points, then the current point's rounds and steps."""

    def __init__(self, total: int, done: int):
        super().__init__()
        self.points = self.bar.add_task("sweep", total=total, completed=done)
        self.bar.start()

    def point(self, name: str) -> None:
        self.bar.update(self.points, description=f"sweep: {name}")

    def point_done(self) -> None:
        self.bar.update(self.points, advance=1)

    def start(self, rounds, first):
        if self.rounds is None:
            self.rounds = self.bar.add_task("rounds", total=rounds, completed=first - 1)
            self.steps = self.bar.add_task("steps", total=1)
        self.last = ""
        self.bar.reset(self.rounds, total=rounds, completed=first - 1, description="rounds")

    def stop(self):  # a point ended; the display lives until the sweep ends
        pass

    def close(self):
        self.bar.stop()


def _figure(summary: dict[str, Any]) -> str:
    acc = summary.get("final_test_accuracy")
    metric = summary.get("test_metric", "accuracy").replace("accuracy", "acc")
    return f"{metric} {acc:.1%}" if acc is not None else "no accuracy"


def run_sweep(exp: Experiment, console=None, live: bool = True, fail_fast: bool = False) -> SweepResult:
    """Run every point of ``exp`` in this process, one after another."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    # An edited experiment must not silently mix old and new results in one report.
    for point in exp.points:
        changed = changed_keys(point) if (Path(point.cfg.out) / SUMMARY).is_file() else []
        if changed:
            raise FedtuneError(
                f"{point.cfg.out} holds a finished run with another config ({', '.join(changed[:3])}); "
                "delete it or sweep into another --out"
            )
    exp.out.mkdir(parents=True, exist_ok=True)
    (exp.out / "experiment.toml").write_text(exp.path.read_text())
    result = SweepResult()
    # Under select_seeds the choice is made first: the selection seeds' points run before the rest.
    todo = sorted(exp.points, key=lambda p: bool(exp.design.select_seeds) and p.seed not in exp.design.select_seeds)
    already = sum((Path(p.cfg.out) / SUMMARY).is_file() for p in todo)
    progress = SweepProgress(len(todo), already) if live else None
    log = progress.bar.console.print if progress else console.print
    try:
        for i, point in enumerate(todo, 1):
            state = selection_state(exp, point)
            if state != "run":
                waiting = f"{point.grid} seed {point.seed}"
                if state == "waiting" and waiting not in result.waiting:
                    result.waiting.append(waiting)
                    log(f"{waiting}: waits until the grid's candidates on seeds {exp.design.select_seeds} "
                        "are done (the choice is made on them)")
                continue
            if progress:
                progress.point(point.name)
            started = time.perf_counter()
            try:
                status, summary = run_point(point, progress)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                if fail_fast:
                    raise
                Path(point.cfg.out).mkdir(parents=True, exist_ok=True)
                (Path(point.cfg.out) / ERROR).write_text(traceback.format_exc())
                result.failed.append(point.name)
                log(f"[{i}/{len(todo)}] {point.name}: [red]failed[/] ({type(exc).__name__}: {escape(str(exc))}); "
                    f"traceback in {Path(point.cfg.out) / ERROR}")
                continue
            if status == "skipped":
                result.skipped.append(point.name)
                continue
            result.done.append(point.name)
            if progress:
                progress.point_done()
            log(f"[{i}/{len(todo)}] {point.name}: {_figure(summary)}, {time.perf_counter() - started:.0f} s")
    finally:
        if progress:
            progress.close()
    return result
