"""What a person sees while a run goes and after it: the progress display (a live bar on a
terminal, plain lines in a log) and the end-of-run table."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

from .metrics import MB, per_round
from .tasks import metric_label, short_label


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def clock(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# The end-of-run table: (header as two short lines, per_round key, format). Two-line headers keep
# ten columns within 80 characters, so no number ever needs cutting.
COLUMNS = [
    (("", "round"), "round", "d"),
    (("test", "acc"), "test_accuracy", ".2%"),
    (("test", "loss"), "test_loss", ".3f"),
    (("train", "loss"), "train_loss", ".3f"),
    (("MB", "up"), "mb_up_per_client", ".3f"),
    (("MB", "down"), "mb_down_per_client", ".3f"),
    (("", "GFLOPs"), "gflops_per_client", ".1f"),
    (("client", "s"), "client_seconds", ".1f"),
    (("peak", "MB"), "client_peak_mem_mb", ".0f"),
    (("round", "s"), "round_seconds", ".1f"),
]
TABLE_NOTE = "MB up/down, GFLOPs and client s: mean per client; peak MB: the largest client's"


def headers(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The column headers; the test metric's is the task's own (acc, rougeL, exact match)."""
    server = [r for r in records if r.get("client") == "server"]
    label = short_label(metric_label(server[-1] if server else None))
    return [("test", label) if key == "test_accuracy" else head for head, key, _ in COLUMNS]


def table_cells(records: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(r[key], spec) for _, key, spec in COLUMNS] for r in per_round(records)]


def plain_table(records: list[dict[str, Any]], title: str = "fedtune") -> str:
    """The table as plain text, every column as wide as its widest cell: for logs and narrow
    terminals, where a drawn table would have to cut numbers."""
    rows = table_cells(records)
    heads = headers(records)
    widths = [max([len(h[0]), len(h[1])] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [title, line([h[0] for h in heads]), line([h[1] for h in heads])]
    out += [line(r) for r in rows]
    return "\n".join(out + [TABLE_NOTE])


def table(records: list[dict[str, Any]], title: str = "fedtune"):
    from rich.table import Table

    t = Table(title=title, caption=TABLE_NOTE)
    for top, bottom in headers(records):
        t.add_column(f"{top}\n{bottom}" if top else bottom, justify="right", no_wrap=True)
    for cells in table_cells(records):
        t.add_row(*cells)
    return t


def print_table(records: list[dict[str, Any]], title: str, console) -> None:
    """The drawn table on a terminal wide enough for all of it, else the plain one."""
    from rich.measure import Measurement

    t = table(records, title)
    natural = Measurement.get(console, console.options.update_width(10_000), t).maximum  # unbounded: no cuts
    if console.is_terminal and natural <= console.width:
        console.print(t)
    else:
        print(plain_table(records, title), file=console.file, flush=True)


class Progress:
    """Silent progress: the interface the runtime reports to."""

    def phase(self, text: str) -> None:
        """What the run does before its first step (loading, tokenizing): said at once."""

    def start(self, rounds: int, first: int) -> None: ...
    def client(self, rnd: int, cid: int, position: int, count: int) -> None: ...
    def step(self, done: int, total: int) -> None: ...
    def client_done(self, rnd: int, cid: int, record: dict[str, Any]) -> None: ...
    def round_done(self, rnd: int, server: dict[str, Any]) -> None: ...
    def stop(self) -> None: ...


class LogProgress(Progress):
    """Plain lines for a log (nohup, tee, a scheduler, CI): one per client-round and one per
    round, with the elapsed time and an ETA; with ``every`` > 0 also a line on the current
    client's steps at most every ``every`` seconds."""

    def __init__(self, clients_per_round: int, local_epochs: int = 1, every: float = 0.0,
                 write: Callable[[str], None] | None = None):
        self.per_round, self.epochs, self.every = clients_per_round, local_epochs, every
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.rounds = self.first = 1
        self.started = self.last_step = time.monotonic()
        self.done_in_round: dict[int, int] = {}
        self.current = ""
        self.metric = "acc"  # the test metric's name, from the last server record
        self.client_started: float | None = None  # until a step is timed
        self.first_step = 0.0

    def phase(self, text):
        self.write(text)

    def start(self, rounds, first):
        self.write(f"ready after {clock(time.monotonic() - self.started)}; training from round {first} of {rounds}")
        self.rounds, self.first = rounds, first
        self.started = self.last_step = time.monotonic()

    def _times(self, fraction: float) -> str:
        elapsed = time.monotonic() - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        return f"elapsed {clock(elapsed)}" + (f", ETA {clock(eta)}" if eta is not None else "")

    def _fraction(self, rnd: int, clients_done: int) -> float:
        """The share of this invocation's work done: rounds done plus the round's clients done."""
        todo = self.rounds - self.first + 1
        return (rnd - self.first + min(clients_done, self.per_round) / self.per_round) / todo

    def client(self, rnd, cid, position, count):
        self.per_round = count
        self.current = f"round {rnd}/{self.rounds} client {cid} ({position}/{count})"
        if rnd == self.first and position == 1:
            self.client_started = time.monotonic()

    def _first_pace(self, done: int, total: int, now: float) -> None:
        """An ETA as soon as a step is timed: the second step's pace (the first carries one-time
        warm-up) for every client's steps still to run; evaluation is not counted, and the client
        and round lines refine it."""
        if done == 1 and total > 1:
            self.first_step = now - self.client_started
            return
        per_step = (now - self.client_started - self.first_step) / max(done - 1, 1)
        clients = self.per_round * (self.rounds - self.first + 1)
        eta = per_step * (total * self.epochs * clients - done)
        self.write(f"{self.current}: {per_step:.2f} s per step (the first took {self.first_step or per_step:.2f} s), "
                   f"{total} steps per client; ETA {clock(eta)} for training")
        self.client_started = None

    def step(self, done, total):
        now = time.monotonic()
        if self.client_started is not None:
            self._first_pace(done, total, now)
        if self.every and (now - self.last_step >= self.every or done == total):
            self.last_step = now
            self.write(f"{self.current or 'client'}: step {done}/{total}, elapsed {clock(now - self.started)}")

    def client_done(self, rnd, cid, record):
        n = self.done_in_round[rnd] = self.done_in_round.get(rnd, 0) + 1
        parts = [f"round {rnd}/{self.rounds} client {cid} ({n}/{self.per_round})"]
        seconds, samples = record.get("client_seconds") or 0.0, record.get("num_samples")
        if samples is not None and seconds > 0:
            parts.append(f"{samples * self.epochs / seconds:.1f} samples/s")
        if record.get("train_loss") is not None:
            parts.append(f"loss {record['train_loss']:.3f}")
        acc = record.get("client_test_accuracy", record.get("test_accuracy"))
        if acc is not None:
            parts.append(f"test {self.metric} {acc:.2%}")
        parts.append(f"{record.get('bytes_up', 0) / MB:.2f} MB up, {record.get('bytes_down', 0) / MB:.2f} MB down")
        parts.append(self._times(self._fraction(rnd, n)))
        self.write(", ".join(parts))

    def round_done(self, rnd, server):
        parts = [f"round {rnd}/{self.rounds} done"]
        if server.get("test_accuracy") is not None:  # eval.every: a round between has no test metric to name
            self.metric = short_label(metric_label(server))
            parts.append(f"test {self.metric} {server['test_accuracy']:.2%}")
        if server.get("test_loss") is not None:
            parts.append(f"test loss {server['test_loss']:.3f}")
        if server.get("round_seconds") is not None:
            parts.append(f"round {server['round_seconds']:.1f} s")
        parts.append(self._times(self._fraction(rnd + 1, 0)))
        self.write(", ".join(parts))


class RichProgress(Progress):
    """A live bar over rounds and one over the current client's steps."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn())
        self.rounds = self.steps = None
        self.last = ""

    def phase(self, text):
        self.bar.console.print(text, highlight=False)

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
        self.last = f" (last {short_label(metric_label(server))} {acc:.1%})" if acc is not None else ""
        self.bar.update(self.rounds, advance=1, description=f"round {rnd}{self.last}")

    def stop(self):
        self.bar.stop()
