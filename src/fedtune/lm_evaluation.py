"""``fedtune eval RUN --tasks gsm8k``: EleutherAI's lm-evaluation-harness (``lm-eval``, the
``eval`` extra) on a finished run's model, the base with the run's final adapter.

Offline by construction: ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set before lm-eval is
imported, and the shipped tasks (``lm_eval_tasks/``) read local files only. ``gsm8k`` is the
shipped ``gsm8k_fedtune`` task: zero-shot, the question formatted exactly as the run's own sft
metric formats it (its chat template or plain template, ``data.system_prompt``, the prompt cut to
``data.max_length`` as its encoding cuts it), the same greedy generation in batches of
``train.eval_batch_size`` with ``eval.max_new_tokens``, and the same exact-match rule
(tasks/sft.final_number). On the run's own test rows (the default when the run read a test file)
its figure is the run's last-round ``test_final_number``. Any other task name goes to lm-eval as
it is (its own prompt format; it must be available offline)."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import FedtuneError
from .lm_eval_tasks import FEDTUNE_FORMAT

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
SHIPPED = {"gsm8k": "gsm8k_fedtune"}  # the name fedtune eval takes -> the shipped lm-eval task
DEFAULT_DATA = "../shared/data/gsm8k"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="run lm-evaluation-harness (offline) on a finished run's model")
    p.add_argument("run_dir", help="a finished run directory (train.task=sft)")
    p.add_argument("--tasks", default="gsm8k", help="comma-separated: gsm8k (shipped, local files) or lm-eval task names")
    p.add_argument("--data", help="the GSM8K rows: a .jsonl file or a folder with test.jsonl (default: the run's own "
                                  f"test file, else {DEFAULT_DATA})")
    p.add_argument("--limit", type=int, help="only the first N rows (default: the rows the run's metric used)")
    p.add_argument("--out", help="where to write the results JSON (default: RUN_DIR/lm_eval.json)")


def find_data(given: str | None, cfg) -> Path:
    """The local GSM8K test file: --data, else the run's own test file, else ../shared/data/gsm8k."""
    if given:
        path = Path(given).expanduser()
    elif cfg.data.path and (Path(cfg.data.path) / "test.jsonl").is_file():
        path = Path(cfg.data.path)
    else:
        here = Path(__file__).resolve()
        tries = [Path.cwd() / DEFAULT_DATA, Path.cwd() / "shared/data/gsm8k"] + [p / "shared/data/gsm8k" for p in here.parents]
        path = next((p for p in tries if (p / "test.jsonl").is_file()), Path.cwd() / DEFAULT_DATA)
    path = path / "test.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FedtuneError(f"{path}: no GSM8K rows found; pass --data FILE.jsonl (question/answer rows)")
    return path.resolve()


def run_rows(cfg, data: Path, limit: int | None) -> tuple[list[int] | None, str]:
    """Which rows of ``data`` to answer -> (indices or None for the first ``limit`` / all, what they are):
    the run's own test rows (its data.test_size subset, the first eval.generate_size of them) when
    ``data`` is the run's test file."""
    if limit:
        return None, f"the first {limit} rows"
    own = cfg.data.path and (Path(cfg.data.path) / "test.jsonl").resolve() == data
    if not own:
        return None, "every row"
    from .data import TEST_SUBSET_SEED

    n = sum(1 for line in data.read_text().splitlines() if line.strip())
    rows = list(range(n))
    if cfg.data.test_size and cfg.data.test_size < n:
        rows = sorted(random.Random(TEST_SUBSET_SEED).sample(rows, cfg.data.test_size))
    if cfg.eval.generate_size:
        rows = rows[: cfg.eval.generate_size]
    return rows, "the run's own test rows"


def task_dir(data: Path) -> Path:
    """The shipped tasks, copied with their data file pointed at ``data``."""
    out = Path(tempfile.mkdtemp(prefix="fedtune-lm-eval-"))
    for f in TASKS_DIR.iterdir():
        if f.suffix == ".yaml" or f.name == "utils.py":
            text = f.read_text()
            if f.suffix == ".yaml":
                text = text.replace(f"{DEFAULT_DATA}/test.jsonl", str(data))
            (out / f.name).write_text(text)
    return out


def evaluate_run(run_dir: str | Path, tasks: list[str], data: str | None = None, limit: int | None = None,
                 out: str | Path | None = None) -> dict[str, Any]:
    """Run lm-eval on the run's model -> {task: {metric: value, "rows": n}}; also written as JSON."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FedtuneError("fedtune eval needs lm-evaluation-harness: pip install 'fedtune[eval]'") from None
    from .inference import load_run
    from .lm_harness import FedtuneLM

    cfg, model, tok, _ = load_run(run_dir)
    if cfg.train.task != "sft":
        raise FedtuneError(f"{run_dir}: fedtune eval answers with a generating model: train.task=sft (got {cfg.train.task})")
    path = find_data(data, cfg)
    rows, which = run_rows(cfg, path, limit)
    names = [SHIPPED.get(t.strip(), t.strip()) for t in tasks if t.strip()]
    folder = task_dir(path)
    try:
        lm = FedtuneLM(cfg, model, tok)
        samples = {n: rows for n in names if n in FEDTUNE_FORMAT} if rows is not None else None
        res = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(folder)),
                              limit=limit, samples=samples or None, log_samples=True, bootstrap_iters=0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    found = {task: {k.split(",")[0]: v for k, v in metrics.items() if not k.startswith(("alias", "sample"))
                    and isinstance(v, (int, float))} for task, metrics in res["results"].items()}
    for task in found:
        found[task]["rows"] = len(res["samples"].get(task, []))
    report = {"run": str(run_dir), "data": str(path), "rows": which, "results": found,
              "answers": {t: [s["resps"][0][0] for s in res["samples"][t]] for t in found}}
    target = Path(out) if out else Path(run_dir) / "lm_eval.json"
    target.write_text(json.dumps(report, indent=1))
    return report


def cmd_eval(args) -> int:
    report = evaluate_run(args.run_dir, args.tasks.split(","), args.data, args.limit, args.out)
    for task, metrics in report["results"].items():
        shown = ", ".join(f"{k} {v:.2%}" if k != "rows" else f"{v} rows" for k, v in metrics.items())
        print(f"{task}: {shown} ({report['rows']} of {report['data']})")
    return 0
