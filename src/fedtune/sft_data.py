"""Prompt/response data for ``train.task = sft``: reading JSONL, JSON, CSV and Parquet rows,
recognising their columns, and the public/private/test split with its partitions.

A row becomes a *conversation* (a list of ``{"role", "content"}`` turns ending with a user
turn) and a *response* (the assistant's answer that the loss is on). Columns are recognised by
their names, in this order:

- ``data.prompt_column`` + ``data.response_column`` when both are set
- ``messages``: a chat; the response is the last assistant turn, the turns before it the prompt
- ``prompt`` / ``response``, ``question`` / ``answer``
- ``instruction`` / ``output`` (Alpaca), with ``input`` appended to the instruction when present

``data.path`` is a file (the test rows are then held out from it) or a directory holding
``train.<ext>`` and ``test.<ext>``. A malformed row is a one-line ``FedtuneError`` naming the
file and line (JSONL, CSV) or row (JSON, Parquet); reading happens before a run directory is
made, so a bad file leaves nothing behind."""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import DataConfig
from .data import (TEST_SUBSET_SEED, FedData, Rows, dirichlet_partition, hold_out, iid_partition, resolve_sizes,
                   val_text)
from .errors import FedtuneError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
log = logging.getLogger(__name__)
PAIRS = [("prompt", "response"), ("question", "answer"), ("instruction", "output")]

Turns = list[dict[str, str]]


@dataclass
class SftRows(Rows):
    """``texts`` holds each prompt as text (the user's words, or the chat as JSON) so that sets
    of prompts can be compared; ``labels`` are the response token ids (``tasks.sft`` sets them
    when it tokenizes, since they depend on the tokenizer)."""

    turns: list[Turns] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # data.partition_column's value per row

    def subset(self, idx: list[int]) -> "SftRows":
        pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
        return SftRows(pick(self.texts), pick(self.labels), pick(self.turns), pick(self.responses), pick(self.groups))


# --------------------------------------------------------------------------- reading files


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each row of a file; ``where`` is 'line N' or 'row N'."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FedtuneError(f"{path}: line {n}: not JSON ({exc.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FedtuneError(f"{path}: line {exc.lineno}: not JSON ({exc.msg})") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise FedtuneError(f"{path}: expected a JSON list of rows")
        for n, record in enumerate(data, start=1):
            yield f"row {n}", record
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            start = 2  # the header is line 1; a quoted field may span lines
            for record in reader:
                yield f"line {start}", record
                start = reader.line_num + 1
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise FedtuneError(f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)") from None
        for n, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"row {n}", record
    else:
        raise FedtuneError(f"{path}: unknown file type; use one of {', '.join(EXTENSIONS)}")


def _columns(keys: set[str], cfg: DataConfig, path: Path) -> tuple[str, str]:
    """The (prompt, response) columns of a file from its first row's keys."""
    if cfg.prompt_column or cfg.response_column:
        if not (cfg.prompt_column and cfg.response_column):
            raise FedtuneError("data.prompt_column and data.response_column must be set together")
        missing = [c for c in (cfg.prompt_column, cfg.response_column) if c not in keys]
        if missing:
            raise FedtuneError(f"{path}: no column {missing[0]!r}; found {', '.join(sorted(keys))}")
        return cfg.prompt_column, cfg.response_column
    if "messages" in keys:
        return "messages", ""
    for prompt, response in PAIRS:
        if prompt in keys and response in keys:
            return prompt, response
    raise FedtuneError(
        f"{path}: no prompt/response columns recognised in {', '.join(sorted(keys))}; expected messages, "
        f"prompt+response, question+answer or instruction(+input)+output, or set data.prompt_column and "
        f"data.response_column"
    )


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else "" if value is None else str(value).strip()


def _chat(value: Any, where: str) -> tuple[Turns, str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # a chat stored as a JSON string (CSV)
        except json.JSONDecodeError:
            raise FedtuneError(f"{where}: messages is not a list of turns") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) and "role" in t and "content" in t for t in value):
        raise FedtuneError(f"{where}: messages must be a list of {{role, content}} turns")
    last = max((i for i, t in enumerate(value) if t["role"] == "assistant"), default=None)
    if last is None:
        raise FedtuneError(f"{where}: messages has no assistant turn to learn")
    turns = [{"role": str(t["role"]), "content": _text(t["content"])} for t in value[:last]]
    if not any(t["role"] == "user" and t["content"] for t in turns):
        raise FedtuneError(f"{where}: empty prompt (no user turn before the last assistant turn)")
    return turns, _text(value[last]["content"])


def read_file(path: Path, cfg: DataConfig) -> SftRows:
    if not path.is_file():
        raise FedtuneError(f"{path}: file not found")
    rows = SftRows([], [])
    prompt_col = response_col = None
    for where, record in _records(path):
        where = f"{path}: {where}"
        if not isinstance(record, dict):
            raise FedtuneError(f"{where}: expected an object with named fields")
        if prompt_col is None:
            prompt_col, response_col = _columns(set(record), cfg, path)
        if prompt_col == "messages":
            turns, response = _chat(record.get("messages"), where)
        else:
            prompt = _text(record.get(prompt_col))
            if prompt_col == "instruction" and _text(record.get("input")):
                prompt = f"{prompt}\n\n{_text(record['input'])}"
            if not prompt:
                raise FedtuneError(f"{where}: empty prompt ({prompt_col!r})")
            turns = [{"role": "user", "content": prompt}]
            response = _text(record.get(response_col))
        if not response:
            raise FedtuneError(f"{where}: missing response ({response_col or 'assistant turn'!r})")
        group = ""
        if cfg.partition_column:
            if cfg.partition_column not in record:
                raise FedtuneError(f"{where}: no column {cfg.partition_column!r} (data.partition_column)")
            group = _text(record[cfg.partition_column])
        single = len(turns) == 1 and turns[0]["role"] == "user"
        rows.texts.append(turns[0]["content"] if single else json.dumps(turns))
        rows.turns.append(turns)
        rows.responses.append(response)
        rows.groups.append(group)
    if not len(rows):
        raise FedtuneError(f"{path}: no rows")
    rows.labels = [0] * len(rows)
    return rows


def pick_task(cfg) -> None:
    """``--data`` given prompt/response rows and no task: a .jsonl, .json or .parquet file, or a
    directory with such a train file and no train.csv, is instruction tuning (train.task=sft),
    which the run says in one line. Classification reads only a directory with train.csv."""
    if cfg.train.task != "classify" or not cfg.data.path:
        return
    root = Path(cfg.data.path).expanduser()
    rows = root.suffix.lower() in (".jsonl", ".json", ".parquet") if root.is_file() else (
        root.is_dir() and not (root / "train.csv").is_file() and _find(root, "train") is not None)
    if rows:
        cfg.train.task = "sft"
        log.info("%s holds prompt/response rows: train.task = sft (instruction tuning; docs/sft.md)", cfg.data.path)


def _find(root: Path, stem: str) -> Path | None:
    found = [root / f"{stem}{ext}" for ext in EXTENSIONS if (root / f"{stem}{ext}").is_file()]
    return found[0] if found else None


def read(cfg: DataConfig) -> tuple[SftRows, SftRows | None]:
    """-> (training rows, test rows or None when the test rows are to be held out)."""
    if not cfg.path:
        raise FedtuneError("train.task=sft needs data.path (--data): a file or a directory with train.jsonl/test.jsonl")
    root = Path(cfg.path).expanduser()
    if root.is_file():
        return read_file(root, cfg), None
    if not root.is_dir():
        raise FedtuneError(f"{root}: no such file or directory")
    train = _find(root, "train")
    if train is None:
        raise FedtuneError(f"{root}: no train file ({', '.join('train' + e for e in EXTENSIONS)})")
    test = _find(root, "test")
    return read_file(train, cfg), read_file(test, cfg) if test else None


# --------------------------------------------------------------------------- the split


def length_partition(rows: SftRows, clients: int) -> list[list[int]]:
    """By length: rows sorted by prompt + response length, cut into equal contiguous shards
    (client 0 holds the shortest): a skew of difficulty rather than of labels."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows.texts[i]) + len(rows.responses[i]), i))
    size, extra = divmod(len(order), clients)
    cuts = [c * size + min(c, extra) for c in range(clients + 1)]
    return [sorted(order[cuts[c] : cuts[c + 1]]) for c in range(clients)]


def load(cfg: DataConfig, clients: int, seed: int, public_rows: bool = True) -> FedData:
    """Read and split prompt/response rows, as ``data.load`` does for labelled text: the test
    set is the test file (or ``data.test_size`` rows held out of a single file); the public set
    comes from the front of the seeded pool and the private set from its back. Auto sizes in
    ``cfg`` become numbers (``data.resolve_sizes``)."""
    train, test = read(cfg)
    resolve_sizes(cfg, len(train), len(test) if test is not None else None, public_rows, cfg.path)
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    if test is None:
        held = cfg.test_size or max(1, len(train) // 10)
        if held >= len(train):
            raise FedtuneError(f"data.test_size ({held}) leaves no training rows in {cfg.path}")
        test, order = train.subset(sorted(order[:held])), order[held:]
    elif cfg.test_size and cfg.test_size < len(test):
        test = test.subset(sorted(random.Random(TEST_SUBSET_SEED).sample(range(len(test)), cfg.test_size)))
    # Training rows whose prompt is also a test prompt go to the private end (as in data.load).
    test_set = set(test.texts)
    order = [i for i in order if train.texts[i] not in test_set] + [i for i in order if train.texts[i] in test_set]
    private_size = cfg.private_size or len(order) - cfg.public_size - cfg.val_size
    if cfg.public_size >= len(order):
        raise FedtuneError(f"data.public_size ({cfg.public_size}) leaves no private rows: only {len(order)} training "
                           f"rows are available in {cfg.path}")
    if private_size < 1 or cfg.public_size + private_size + cfg.val_size > len(order):
        raise FedtuneError(
            f"data.public_size ({cfg.public_size}) + data.private_size ({cfg.private_size}){val_text(cfg)} exceed "
            f"the {len(order)} training rows available in {cfg.path}"
        )
    public, private = train.subset(order[: cfg.public_size]), train.subset(order[len(order) - private_size :])
    val = train.subset(order[cfg.public_size : cfg.public_size + cfg.val_size])  # between the two: disjoint
    part_rng = random.Random(f"partition-{seed}")
    if cfg.partition == "iid":
        shards = iid_partition(len(private), clients, part_rng)
    elif cfg.partition == "length":
        shards = length_partition(private, clients)
    else:
        if not cfg.partition_column:
            raise FedtuneError("data.partition=dirichlet with train.task=sft needs data.partition_column (a label-like column)")
        names = sorted(set(private.groups))
        shards = dirichlet_partition([names.index(g) for g in private.groups], clients, cfg.dirichlet_alpha, part_rng)
    for c, shard in enumerate(shards):
        if not shard:
            raise FedtuneError(
                f"client {c} was left with no data ({len(private)} private rows over {clients} clients, "
                f"partition={cfg.partition}); use fewer clients, more data or a larger dirichlet_alpha"
            )
    shards, tests = hold_out(shards, cfg.client_test_size, seed)
    return FedData([], public, [private.subset(s) for s in shards], test, val, [private.subset(t) for t in tests])
