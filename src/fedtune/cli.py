"""The ``fedtune`` command: run (and resume) a federated fine-tuning job."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import sys
from pathlib import Path

from . import config as configlib
from .errors import FedtuneError
from .frameworks import FRAMEWORKS
from .tasks import TASKS
from .cli_args import FLAGS, parser

def preflight(cfg) -> None:
    """Check the data and the model source before any work and before a run directory exists,
    so that bad input is one line and leaves nothing behind. What it resolves (the data path,
    the split layer, train.precision=auto) goes into ``cfg``, so that config.toml reproduces the run
    elsewhere."""
    from . import config as configlib
    from . import data as datalib
    from . import models, precision
    from .sft_data import pick_task
    from .tasks import TASKS

    pick_task(cfg)
    TASKS.load(cfg.train.task).load_data(cfg)
    cfg.data.path = datalib.resolved_path(cfg.data)
    models.resolve(cfg.model.name)
    precision.resolve(cfg)
    if FRAMEWORKS.has(cfg.framework, "split_cut"):
        depth = models.depth(cfg.model.name)  # from the model's config: no weights are loaded
        if depth < 2:
            raise FedtuneError(f"split learning needs a model of at least 2 blocks; {cfg.model.name} has {depth}")
        layer = configlib.split_layer_for(cfg.split.split_layer, depth)
        if not 1 <= layer <= depth - 1:
            raise FedtuneError(
                f"split.split_layer={layer}: {cfg.model.name} has {depth} transformer blocks, so the client can keep "
                f"1..{depth - 1} of them (0 = auto: 2, or L-1 for shallower models)"
            )
        cfg.split.split_layer = layer


def _progress(args, cfg, console):
    from .console import LogProgress, Progress, RichProgress

    if args.quiet:
        return Progress()
    if console.is_terminal:
        return RichProgress()
    from .runtimes.rounds import sample_clients

    # No terminal (nohup, tee, a scheduler, CI): a live bar shows nothing there; plain lines do.
    return LogProgress(len(sample_clients(cfg, 1)), cfg.train.local_epochs, args.log_every)


def _overrides(args) -> dict:
    overrides = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
    overrides.update(configlib.parse_overrides(args.set))
    return overrides


# What a resumed run may change: how it is evaluated, how many threads compute it and how long it
# goes on. Any other key would make the rounds already done and the rounds to come two runs.
RESUMABLE = ("eval.", "train.threads", "fed.rounds")


def _resumed_config(args, rundir, cfg):
    """-> (the saved config with the resumable overrides, the keys they changed); a key that may not
    change is a one-line error naming it, before anything is written."""
    if args.config:
        raise FedtuneError(f"--resume continues {rundir.path} with its own config.toml; change a key with --set")
    overrides = _overrides(args)
    if "out" in overrides and Path(overrides["out"]).resolve() == rundir.path.resolve():
        del overrides["out"]
    new = copy.deepcopy(cfg)
    for key, value in overrides.items():
        configlib.set_key(new, key, value)
    before, after = configlib.flat_dict(cfg), configlib.flat_dict(new)
    changed = [k for k in after if after[k] != before[k]]
    fixed = [k for k in changed if not k.startswith(RESUMABLE)]
    if "fed.rounds" in changed and cfg.privacy.target_epsilon:
        fixed.append("fed.rounds (privacy.target_epsilon calibrated the noise to the rounds)")
    if fixed:
        raise FedtuneError(f"--resume cannot change {', '.join(fixed)}: the rounds done would belong to another run; "
                           f"only eval.*, train.threads and fed.rounds may change (start a new run with --out)")
    configlib.validate(new)
    return new, changed


def _resume(args):
    from .console import plural
    from .rundir import CONFIG, RunDir

    rundir, saved = RunDir.open(args.resume)
    cfg, changed = _resumed_config(args, rundir, saved)
    preflight(cfg)
    done = rundir.last_round()  # an unreadable checkpoint: a one-line error before any work
    if cfg.fed.rounds < done:
        raise FedtuneError(f"fed.rounds={cfg.fed.rounds}: {rundir.path} has done {plural(done, 'round')} already")
    if changed:
        configlib.save(cfg, rundir.path / CONFIG)  # config.toml reproduces the run as it now goes on
        before, after = configlib.flat_dict(saved), configlib.flat_dict(cfg)
        print("fedtune: resuming with " + ", ".join(f"{k}={after[k]} (was {before[k]})" for k in changed),
              file=sys.stderr)
    rundir.record_environment(cfg, resumed_from=done + 1)
    start = (f"resuming {rundir.path} from round {done + 1} of {cfg.fed.rounds}" if done < cfg.fed.rounds
             else f"{rundir.path}: all {plural(cfg.fed.rounds, 'round')} done; writing its results again")
    return rundir, cfg, start


def cmd_run(args) -> int:
    from rich.console import Console

    from .console import plural, print_table
    from .rundir import RunDir
    from .runtimes import run

    console = Console(stderr=True)
    if args.resume:
        rundir, cfg, start = _resume(args)
    else:
        cfg = configlib.build_config(args.preset, args.config, _overrides(args))
        preflight(cfg)
        rundir = RunDir.create(cfg)
        start = f"{plural(cfg.fed.clients, 'client')}, {plural(cfg.fed.rounds, 'round')} -> {rundir.path}"
    console.print(f"[bold]fedtune[/] {cfg.framework} on {cfg.model.name}: {start}", highlight=False, soft_wrap=True)
    progress = _progress(args, cfg, console)
    progress.phase(f"loading {cfg.model.name}, reading and tokenizing the data")
    try:
        summary = run(cfg, rundir, progress, resume=bool(args.resume))
    except Exception:
        if not args.resume and not rundir.metrics.path.exists():
            rundir.discard()
        raise
    except KeyboardInterrupt as exc:
        done = rundir.last_round()
        after = f"after round {done}" if done else "before the first round ended"
        print(f"fedtune: stopped {after}; resume with --resume {rundir.path}", file=sys.stderr)
        return _exit_status(exc)
    if not args.quiet:
        print_table(rundir.metrics.records(), f"fedtune {cfg.framework} ({rundir.path})", Console())
    acc = summary.get("final_test_accuracy")
    metric = summary.get("test_metric", "accuracy")
    print(f"final test {metric} {acc:.2%}; results in {rundir.path}" if acc is not None else f"results in {rundir.path}")
    return 0


def _only(exp, attr: str, wanted: list, missing: str, listing: str) -> list:
    """The sweep's points whose ``attr`` (grid or seed) is one of ``wanted`` (all when none is)."""
    if not wanted:
        return exp.points
    have = list(dict.fromkeys(getattr(p, attr) for p in exp.points))
    unknown = [w for w in dict.fromkeys(wanted) if w not in have]
    if unknown:
        raise FedtuneError(f"{exp.path}: {missing} {', '.join(map(str, unknown))}; {listing}: {', '.join(map(str, have))}")
    return [p for p in exp.points if getattr(p, attr) in wanted]


def _dry_run(exp) -> int:
    """List the points a sweep would run and how far each is; under select_seeds, one line per
    grid and seed whose point is chosen later."""
    from .rundir import CONFIG, SUMMARY
    from .sweep import selection_state

    lines: dict[str, str] = {}
    for p in exp.points:
        choice = selection_state(exp, p)
        if choice == "waiting":  # one of the grid's candidates, not known yet
            seeds = ", ".join(map(str, exp.design.select_seeds))
            lines[f"{p.grid} seed {p.seed}"] = f"the point chosen on seed(s) {seeds}, once they are done"
        elif choice == "run":
            out = Path(p.cfg.out)
            lines[p.cfg.out] = "done" if (out / SUMMARY).is_file() else "started" if (out / CONFIG).is_file() else ""
    for where, state in lines.items():
        print(f"{where}  {state}")
    print(f"{len(lines)} points")
    return 0


def cmd_sweep(args) -> int:
    from rich.console import Console

    from .sweep import load, run_sweep
    from .report import write_report

    console = Console(stderr=True)
    exp = load(args.experiment, args.out)
    exp.points = _only(exp, "grid", args.grid, "no grid named", "grids")
    exp.points = _only(exp, "seed", args.seed, "no point has seed", "seeds")
    if args.dry_run:
        return _dry_run(exp)
    later = f" (on seeds other than {exp.design.select_seeds}, only each grid's chosen point)" if exp.design.select_seeds else ""
    console.print(f"[bold]fedtune sweep[/] {exp.path}: {len(exp.points)} points{later} -> {exp.out}")
    result = run_sweep(exp, console, live=not args.quiet and console.is_terminal, fail_fast=args.fail_fast)
    waiting = f", {len(result.waiting)} waiting for the choice on seeds {exp.design.select_seeds}" if result.waiting else ""
    console.print(f"{len(result.done)} run, {len(result.skipped)} already done, {len(result.failed)} failed{waiting}")
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
    from .report import write_report

    print(f"report: {write_report(args.sweep_dir, args.out, args.baseline)}")
    return 0


def cmd_generate(args) -> int:
    from .inference import generate, read_prompts

    if (args.prompt is None) == (args.file is None):
        raise FedtuneError("give a prompt or --file PROMPTS.jsonl (one of the two)")
    convs = list(read_prompts(args.file)) if args.file else [[{"role": "user", "content": args.prompt}]]
    generate(args.run_dir, convs, args.max_new_tokens, client=args.client)
    return 0


def cmd_export(args) -> int:
    from .inference import export

    print(f"exported: {export(args.run_dir, args.merged, args.dtype, args.client)}")
    return 0


def cmd_audit(args) -> int:
    from .privacy.audit import AUDIT, audit_dir

    result = audit_dir(args.run_dir)
    print(json.dumps(result, indent=2, default=str))
    print(f"wrote {Path(args.run_dir) / AUDIT}", file=sys.stderr)
    return 0


def cmd_config(args) -> int:
    from .config_help import listing

    print(listing())
    return 0


def cmd_eval(args) -> int:
    from .lm_evaluation import cmd_eval as run_eval

    return run_eval(args)


COMMANDS = {"config": cmd_config, "run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "generate": cmd_generate,
            "export": cmd_export, "eval": cmd_eval, "audit": cmd_audit}


class Stopped(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (SIGTERM from kill, a scheduler or CI), handled like it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _exit_status(exc: KeyboardInterrupt) -> int:
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


class _StderrLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"fedtune: {record.getMessage()}", file=sys.stderr)  # sys.stderr looked up per call: tests swap it


def _own_log_lines() -> None:
    # fedtune's warnings read like its errors. Without a handler of its own they would take the root
    # logger's format, which a dependency may set at import (Opacus sets a dated one).
    log = logging.getLogger("fedtune")
    if not log.handlers:
        log.addHandler(_StderrLines())
        log.setLevel(logging.INFO)  # what a run decided (split's planned cuts) is shown, like its warnings
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    # fedtune never downloads at run time unless asked (HF_HUB_OFFLINE=0): an unknown model name
    # is then an error at once, not a minute of retries. Set before huggingface_hub is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _own_log_lines()
    args = parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return COMMANDS[args.command](args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("fedtune: interrupted; resume with --resume (a sweep: rerun the same command)", file=sys.stderr)
        return _exit_status(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
