"""What a person sees while a run goes and after it: the progress display and the end-of-run
table."""

from __future__ import annotations

import math
from typing import Any

from .metrics import per_round


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def table(records: list[dict[str, Any]], title: str = "fedtune"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("round", "test acc", "test loss", "train loss", "MB up/client", "MB down/client",
                "GFLOPs/client", "client s", "peak MB", "round s"):
        t.add_column(col, justify="right")
    for r in per_round(records):
        t.add_row(
            str(r["round"]), _fmt(r["test_accuracy"], ".2%"), _fmt(r["test_loss"], ".3f"), _fmt(r["train_loss"], ".3f"),
            _fmt(r["mb_up_per_client"], ".3f"), _fmt(r["mb_down_per_client"], ".3f"), _fmt(r["gflops_per_client"], ".1f"),
            _fmt(r["client_seconds"], ".1f"), _fmt(r["client_peak_mem_mb"], ".0f"), _fmt(r["round_seconds"], ".1f"),
        )
    return t


class Progress:
    """Silent progress: the interface the runtime reports to."""

    def start(self, rounds: int, first: int) -> None: ...
    def client(self, rnd: int, cid: int, position: int, count: int) -> None: ...
    def step(self, done: int, total: int) -> None: ...
    def client_done(self, rnd: int, cid: int, record: dict[str, Any]) -> None: ...
    def round_done(self, rnd: int, server: dict[str, Any]) -> None: ...
    def stop(self) -> None: ...


class RichProgress(Progress):
    """A live bar over rounds and one over the current client's steps."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.rounds = self.steps = None
        self.last = ""

    def start(self, rounds, first):
        self.bar.start()
        self.rounds = self.bar.add_task("rounds", total=rounds, completed=first - 1)
        self.steps = self.bar.add_task("steps", total=1)

    def client(self, rnd, cid, position, count):
        self.bar.update(self.rounds, description=f"round {rnd}{self.last}")
        self.bar.update(self.steps, description=f"  client {cid} ({position}/{count})", completed=0, total=1)

    def step(self, done, total):
        self.bar.update(self.steps, completed=done, total=total)

    def round_done(self, rnd, server):
        acc = server.get("test_accuracy")
        self.last = f" (last acc {acc:.1%})" if acc is not None else ""
        self.bar.update(self.rounds, advance=1, description=f"round {rnd}{self.last}")

    def stop(self):
        self.bar.stop()
