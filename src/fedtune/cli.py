"""The ``fedtune`` command: run (and resume) a federated fine-tuning job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import FedtuneError
from .frameworks import FRAMEWORKS
from .runtimes import RUNTIMES
from .tasks import TASKS

# Flags for the common knobs; everything else is --set section.key=value.
FLAGS = {
    "framework": "framework", "model": "model.name", "data": "data.path", "clients": "fed.clients",
    "rounds": "fed.rounds", "seed": "seed", "out": "out", "runtime": "runtime", "task": "train.task",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of LLMs with LoRA.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one federated fine-tuning job")
    r.add_argument("--framework", choices=FRAMEWORKS.names)
    r.add_argument("--model", help="smollm2 (embedded default), minilm, tiny-gpt2, a HF id, a directory or a .gguf file")
    r.add_argument("--data", help="directory with train.csv/test.csv (text,category) or a HF dataset id")
    r.add_argument("--clients", type=int)
    r.add_argument("--rounds", type=int)
    r.add_argument("--seed", type=int)
    r.add_argument("--out", help="run directory (default runs/<framework>-<time>)")
    r.add_argument("--runtime", choices=RUNTIMES.names)
    r.add_argument("--task", choices=TASKS.names)
    r.add_argument("--preset", default="demo", help="demo (default, ~10 min on 2 cores) or paper (the case study)")
    r.add_argument("--config", help="TOML or YAML file with config sections")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    r.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar or table")
    s = sub.add_parser("sweep", help="run a grid of configs x seeds from an experiment file, then report")
    s.add_argument("experiment", help="experiment TOML file (see docs/sweeps.md)")
    s.add_argument("--out", help="sweep directory (default: the file's [sweep] out, else runs/sweep-<file stem>)")
    s.add_argument("--dry-run", action="store_true", help="list the points and exit")
    s.add_argument("--fail-fast", action="store_true", help="stop at the first failing point")
    s.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--grid", action="append", default=[], metavar="NAME",
                   help="run only this grid's points (repeatable): sweeps of different grids may run side by side")
    rp = sub.add_parser("report", help="aggregate a sweep directory over seeds into figures and report.md")
    rp.add_argument("sweep_dir", help="directory holding run directories (searched recursively)")
    rp.add_argument("--out", help="where to write report.md and the figures (default: SWEEP_DIR)")
    return p


def preflight(cfg) -> None:
    """Check the data and the model source before a run directory is made, so that bad input
    leaves nothing behind."""
    from . import data as datalib
    from . import models

    datalib.load(cfg.data, cfg.fed.clients, cfg.seed)
    models.resolve(cfg.model.name)


def cmd_run(args) -> int:
    from rich.console import Console

    from . import config as configlib
    from .console import Progress, RichProgress, table
    from .rundir import RunDir
    from .runtimes import run

    if args.resume:
        rundir, cfg = RunDir.open(args.resume)
    else:
        overrides = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
        overrides.update(configlib.parse_overrides(args.set))
        cfg = configlib.build_config(args.preset, args.config, overrides)
        preflight(cfg)
        rundir = RunDir.create(cfg)
    console = Console(stderr=True)
    console.print(f"[bold]fedtune[/] {cfg.framework} on {cfg.model.name}: {cfg.fed.clients} clients, "
                  f"{cfg.fed.rounds} rounds -> {rundir.path}")
    progress = Progress() if args.quiet or not console.is_terminal else RichProgress()
    summary = run(cfg, rundir, progress, resume=bool(args.resume))
    if not args.quiet:
        Console().print(table(rundir.metrics.records(), title=f"fedtune {cfg.framework} ({rundir.path})"))
    acc = summary.get("final_test_accuracy")
    print(f"final test accuracy {acc:.2%}; results in {rundir.path}" if acc is not None else f"results in {rundir.path}")
    return 0


def cmd_sweep(args) -> int:
    from rich.console import Console

    from .rundir import CONFIG, SUMMARY
    from .sweep import load, run_sweep
    from .sweep_report import write_report

    console = Console(stderr=True)
    exp = load(args.experiment, args.out)
    if args.grid:
        unknown = sorted(set(args.grid) - {p.grid for p in exp.points})
        if unknown:
            raise FedtuneError(f"{exp.path}: no grid named {', '.join(unknown)}; grids: "
                               f"{', '.join(dict.fromkeys(p.grid for p in exp.points))}")
        exp.points = [p for p in exp.points if p.grid in args.grid]
    if args.dry_run:
        for p in exp.points:
            state = "done" if (Path(p.cfg.out) / SUMMARY).is_file() else "started" if (Path(p.cfg.out) / CONFIG).is_file() else ""
            print(f"{p.cfg.out}  {state}")
        print(f"{len(exp.points)} points")
        return 0
    console.print(f"[bold]fedtune sweep[/] {exp.path}: {len(exp.points)} points -> {exp.out}")
    result = run_sweep(exp, console, live=not args.quiet and console.is_terminal, fail_fast=args.fail_fast)
    console.print(f"{len(result.done)} run, {len(result.skipped)} already done, {len(result.failed)} failed")
    if not args.no_report:
        try:
            print(f"report: {write_report(exp.out)}")
        except FedtuneError as exc:  # e.g. every point failed: the failures matter more
            console.print(f"no report: {exc}")
    if result.failed:
        print(f"failed points (rerun the same command to retry them): {', '.join(result.failed)}")
        return 1
    return 0


def cmd_report(args) -> int:
    from .sweep_report import write_report

    print(f"report: {write_report(args.sweep_dir, args.out)}")
    return 0


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted; resume with --resume (a sweep: rerun the same command)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
