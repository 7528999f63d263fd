"""Where a run's wall time goes: process start, model load, data and tokenization, and per
round local training, evaluation, aggregation, state swap, serialization, checkpoint and
metrics, each counted once (a region's time excludes the regions timed inside it).

    python benchmarks/round_breakdown.py --setting demo      # the demo (SmolLM2, fedavg)
    python benchmarks/round_breakdown.py --setting minilm    # a small MiniLM Banking77 run
    python benchmarks/round_breakdown.py --setting tiny      # a seconds-long check that it runs
    ... --set train.precision=auto --set fed.rounds=2        # any config key on top

It wraps fedtune's own functions with timers in this process only (nothing in fedtune changes)
and prints a Markdown table; the target is that everything that is neither local training nor
evaluation stays at most 5% of a round.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before torch and transformers are imported: their import is process start

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from functools import wraps  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

from fedtune import cli  # noqa: E402
from fedtune import config as configlib  # noqa: E402
from fedtune import models  # noqa: E402
from fedtune.frameworks import base as fwbase  # noqa: E402
from fedtune.metrics import MetricsLog  # noqa: E402
from fedtune.rundir import RunDir  # noqa: E402
from fedtune.runtimes import rounds  # noqa: E402

IMPORTED = time.perf_counter()

SETTINGS = {
    "demo": {},
    "minilm": {"model.name": "minilm", "fed.rounds": 3},
    "tiny": {"model.name": "tiny-gpt2", "data.private_size": 120, "data.public_size": 40, "data.test_size": 60,
             "data.max_labels": 4, "fed.clients": 3, "fed.rounds": 2, "train.threads": 1},
}
# In the order the table lists them; "other" is the run's wall time that no timer covers.
REGIONS = ("preflight", "model load", "data + tokenization", "local training", "evaluation", "aggregation", "state swap",
           "serialization", "checkpoint", "metrics", "final adapter + summary")
PER_ROUND = ("local training", "evaluation", "aggregation", "state swap", "serialization", "checkpoint", "metrics")


class Clock:
    """Exclusive time per region: a region's time excludes the regions timed inside it."""

    def __init__(self):
        self.seconds = dict.fromkeys(REGIONS, 0.0)
        self.stack: list[list] = []  # [region, start, time spent in nested regions]

    @contextmanager
    def region(self, name: str):
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            region, start, nested = self.stack.pop()
            spent = time.perf_counter() - start
            self.seconds[region] += spent - nested
            if self.stack:
                self.stack[-1][2] += spent

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @wraps(fn)
        def timed(*args, **kwargs):
            with self.region(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def instrument(clock: Clock) -> None:
    clock.wrap(models, "build", "model load")
    clock.wrap(fwbase.Context, "build", "data + tokenization")  # minus the model load inside it
    clock.wrap(fwbase.Framework, "client_fit", "local training")
    clock.wrap(fwbase.Framework, "evaluate", "evaluation")
    for name in ("set_tunable", "get_tunable"):
        clock.wrap(models, name, "state swap")
    for name in ("serialize", "deserialize"):
        clock.wrap(rounds, name, "serialization")
    clock.wrap(RunDir, "save_checkpoint", "checkpoint")
    clock.wrap(MetricsLog, "append", "metrics")
    clock.wrap(rounds, "finish", "final adapter + summary")
    # Aggregation is whatever close_round does besides evaluating, logging and checkpointing.
    clock.wrap(rounds, "close_round", "aggregation")
    for cls in _framework_classes():
        if "evaluate" in vars(cls):  # a framework's own evaluate also counts as evaluation
            clock.wrap(cls, "evaluate", "evaluation")


def _framework_classes():
    from fedtune.frameworks import FRAMEWORKS

    return [FRAMEWORKS.load(name) for name in FRAMEWORKS.names]


def table(clock: Clock, wall: float, rounds_run: int, process_start: float) -> str:
    total = wall + process_start
    other = wall - sum(clock.seconds.values())
    rows = [("process start (imports)", process_start), *clock.seconds.items(), ("other", other)]
    lines = ["| where | seconds | share of the run | per round |", "|---|---:|---:|---:|"]
    for name, secs in rows:
        per = f"{secs / rounds_run:.2f}" if name in PER_ROUND else ""
        lines.append(f"| {name} | {secs:.2f} | {100 * secs / total:.1f}% | {per} |")
    lines.append(f"| **total** | {total:.2f} | 100% | |")
    in_rounds = sum(clock.seconds[k] for k in PER_ROUND)
    waste = in_rounds - clock.seconds["local training"] - clock.seconds["evaluation"]
    lines.append("")
    lines.append(f"Within the rounds ({in_rounds:.2f} s over {rounds_run}), neither local training nor "
                 f"evaluation: {waste:.2f} s = {100 * waste / max(in_rounds, 1e-9):.1f}% (target <= 5%).")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key on top")
    args = p.parse_args(argv)
    clock = Clock()
    instrument(clock)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {**SETTINGS[args.setting], **configlib.parse_overrides(args.set), "out": str(Path(tmp) / "run")}
        cfg = configlib.build_config("demo", None, overrides)
        from fedtune.runtimes import run

        start = time.perf_counter()
        with clock.region("preflight"):  # the data read once to check it, as `fedtune run` does
            cli.preflight(cfg)
        rundir = RunDir.create(cfg)
        run(cfg, rundir)
        wall = time.perf_counter() - start
    print(f"## Round breakdown: --setting {args.setting} {' '.join('--set ' + s for s in args.set)}".rstrip())
    print()
    print(f"{cfg.model.name}, {cfg.framework}, {cfg.fed.clients} clients, {cfg.fed.rounds} rounds, "
          f"train.precision={cfg.train.precision}, attention {cfg.model.attn_implementation}, "
          f"{torch.get_num_threads()} threads")
    print()
    print(table(clock, wall, cfg.fed.rounds, IMPORTED - STARTED))


if __name__ == "__main__":
    main()
