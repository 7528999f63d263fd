"""The run directory: resolved config, metrics log, per-round checkpoint, final adapter and
summary. Shared by every runtime so that all of them leave the same files behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import config as configlib
from . import precision
from .errors import FedtuneError
from .metrics import MetricsLog, summarize

CONFIG, METRICS, CHECKPOINT, SUMMARY, ADAPTER = "config.toml", "metrics.jsonl", "checkpoint.pt", "summary.json", "adapter"
ENVIRONMENT = "environment.json"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = MetricsLog(self.path / METRICS)

    @classmethod
    def create(cls, cfg: configlib.RunConfig) -> "RunDir":
        out = Path(cfg.out or f"runs/{cfg.framework}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / CHECKPOINT).exists() or (out / METRICS).exists():
            raise FedtuneError(f"{out}: already holds a run; use --resume {out} or another --out")
        out.mkdir(parents=True, exist_ok=True)
        cfg.out = str(out)
        precision.resolve(cfg)  # config.toml records the precision chosen, never "auto"
        configlib.save(cfg, out / CONFIG)
        rundir = cls(out)
        rundir.record_environment(cfg)
        return rundir

    @classmethod
    def open(cls, path: str | Path) -> tuple["RunDir", configlib.RunConfig]:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FedtuneError(f"{path}: not a run directory (no {CONFIG})")
        return cls(path), configlib.build_config(file=path / CONFIG)

    def discard(self) -> None:
        """Remove what ``create`` wrote, for a run that failed before its first record: bad input
        found only once the model is built leaves nothing behind either."""
        (self.path / CONFIG).unlink(missing_ok=True)
        (self.path / ENVIRONMENT).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:  # the directory held other files before: they stay
            pass

    def record_environment(self, cfg: configlib.RunConfig, resumed_from: int = 0) -> None:
        """environment.json: what the run's numbers depend on besides config.toml (environment.py).
        A resume adds its own under "resumes": the rounds after it ran there."""
        from .environment import describe

        env, path = describe(cfg), self.path / ENVIRONMENT
        if resumed_from and path.is_file():
            first = json.loads(path.read_text())
            first["resumes"] = [*first.get("resumes", []), {"from_round": resumed_from, **env}]
            env = first
        path.write_text(json.dumps(env, indent=2))

    def save_checkpoint(self, rnd: int, state: dict[str, Any]) -> None:
        # Written then renamed: a run killed while saving keeps the previous checkpoint.
        tmp = self.path / (CHECKPOINT + ".tmp")
        torch.save({"round": rnd, **state}, tmp)
        os.replace(tmp, self.path / CHECKPOINT)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state after the last completed round, or None before the first; a file that
        cannot be read is a one-line error that says what the user can do."""
        p = self.path / CHECKPOINT
        if not p.is_file():
            return None
        try:
            ckpt = torch.load(p, weights_only=False)
            ckpt["round"]
        except Exception as exc:  # truncated or corrupt files raise many types (pickle, zip, EOF, OS)
            reason = f"{type(exc).__name__}: {(str(exc) or '-').splitlines()[0]}"
            done = max((r["round"] for r in self.metrics.records() if r["client"] == "server"), default=0)
            lost = f"it held the state after round {done}, the last metrics.jsonl records; " if done else ""
            raise FedtuneError(
                f"{p}: unreadable, truncated or corrupt ({reason}); {lost}no older checkpoint is kept, so delete "
                f"{p} and run --resume {self.path} again to redo the run from round 1 in this directory, or start "
                f"a new run"
            ) from None
        return ckpt

    def last_round(self) -> int:
        """The last round the checkpoint holds; 0 before the first."""
        ckpt = self.load_checkpoint()
        return ckpt["round"] if ckpt else 0

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        from .tasks import metric_label

        records = self.metrics.records()
        server = [r for r in records if r["client"] == "server"]
        # What final/best_test_accuracy measure: the task's own metric (sweep lines and README name it).
        summary = summarize(records, {"test_metric": metric_label(server[-1] if server else None), **extra})
        (self.path / SUMMARY).write_text(json.dumps(summary, indent=2))
        return summary

    def write_adapter_readme(self, cfg: configlib.RunConfig, summary: dict[str, Any]) -> None:
        """adapter/README.md: what the run was and how to load its adapter (code runnable as printed)."""
        from .models import TINY, base_reference

        adapter = (self.path / ADAPTER).resolve()
        base, how = base_reference(cfg.model.name)
        acc, best = summary.get("final_test_accuracy"), summary.get("best_test_accuracy")
        labels = len(json.loads((adapter / "labels.json").read_text()))
        metric = summary.get("test_metric", "accuracy")
        task = "sft (instruction tuning on prompt/response rows)" if cfg.train.task == "sft" else \
            f"{cfg.train.task}, {labels} labels (labels.json)"
        rows = [
            ("base model", f"`{base}`: {how}"),
            ("task", task),
            ("data", f"`{cfg.data.path or 'Banking77 (default)'}`: {cfg.fed.clients} clients, {cfg.data.partition} partition"),
            ("framework", f"{cfg.framework} (strategy {cfg.fed.strategy}, runtime {cfg.runtime})"),
            ("rounds", str(summary.get("rounds", cfg.fed.rounds))),
            (f"final test {metric}", f"{acc:.2%} (best {best:.2%})" if acc is not None else "-"),
            ("seed", str(cfg.seed)),
        ]
        if cfg.model.name in TINY:
            use = "Nothing outside fedtune can load it: its base is a random-init test model.\n"
        elif cfg.train.task == "classify":
            use = f"```python\n{adapter_snippet(str(adapter))}```\n"
        elif cfg.train.task == "sft":
            use = sft_use(cfg.data.system_prompt)
        else:
            use = ("Load the base with `AutoModelForCausalLM`, then `PeftModel.from_pretrained(base, adapter)`; the "
                   "model writes the intent after the prompt `Query: <text>\\nIntent:` (greedy decoding).\n")
        text = "\n".join([
            f"# fedtune adapter: {cfg.framework} on {cfg.model.name}", "",
            "A LoRA adapter (with the classification head, for classify) in PEFT format, the final global model of "
            f"the federated run in `{self.path.resolve()}` (its `config.toml` reproduces the run; `metrics.jsonl` "
            "holds every round).", "",
            "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
            "## Use it", "", use,
        ])
        (adapter / "README.md").write_text(text)


def sft_use(system_prompt: str) -> str:
    """How an sft adapter is prompted: as training and evaluation prompted it (tasks/sft.py)."""
    system = (f"the system turn {json.dumps(system_prompt)} (data.system_prompt) first" if system_prompt else
              "no system turn (a template's own default system prompt is left out)")
    return ("Load the base with `AutoModelForCausalLM`, then `PeftModel.from_pretrained(base, adapter)`. A prompt is "
            "the conversation through the tokenizer's chat template (`apply_chat_template(messages, "
            f"add_generation_prompt=True)`), with {system}; a tokenizer without a template takes "
            "`### Instruction:\\n<prompt>\\n\\n### Response:\\n`. The model writes the response after it and ends it "
            "with end-of-sequence (greedy decoding). `fedtune generate RUN_DIR \"prompt\"` answers this way, and "
            "`fedtune export RUN_DIR --merged OUT` writes a model whose chat template does the same.\n")


# How to load and use a classify adapter: docs/run-directory.md prints it with the newest run's
# adapter, every adapter/README.md with its own path; tests run it.
SNIPPET = """\
import json
IMPORTS
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ADAPTER
labels = json.load(open(f"{adapter}/labels.json"))
tok = AutoTokenizer.from_pretrained(adapter)
# transformers reports a newly initialized head here: the adapter's trained head replaces it.
base = AutoModelForSequenceClassification.from_pretrained(
    PeftConfig.from_pretrained(adapter).base_model_name_or_path, num_labels=len(labels), pad_token_id=tok.pad_token_id)
model = PeftModel.from_pretrained(base, adapter).eval()
with torch.no_grad():
    logits = model(**tok(["I still have not received my new card"], return_tensors="pt")).logits
print(labels[logits.argmax(-1).item()])
"""
NEWEST_ADAPTER = 'adapter = max(glob.glob("runs/*/adapter"), key=os.path.getmtime)  # the newest run\'s'


def adapter_snippet(adapter: str | None = None) -> str:
    """The snippet for the adapter at ``adapter``, or (None) for the newest one under runs/."""
    if adapter is None:
        return SNIPPET.replace("import json\nIMPORTS", "import glob\nimport json\nimport os\n").replace("ADAPTER", NEWEST_ADAPTER)
    return SNIPPET.replace("IMPORTS\n", "\n").replace("ADAPTER", f"adapter = {json.dumps(adapter)}")
