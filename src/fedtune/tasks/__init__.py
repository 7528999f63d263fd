"""Tasks: what a model is asked to output (one file each, one line each in the registry below,
``train.task``). ``base.Task`` says what every task provides."""

from __future__ import annotations

from ..registry import Registry

TASKS = Registry("train.task", {
    "classify": "fedtune.tasks.classify:ClassifyTask",
    "generate": "fedtune.tasks.generate:GenerateTask",
    "sft": "fedtune.tasks.sft:SftTask",
}, titles={"classify": "classification", "generate": "generation", "sft": "instruction tuning"}, traits={
    # labelled: rows carry a label (label skew, kd.align, continual's label groups);
    # head: a classification head on PEFT's forward (prompt/prefix tuning, per-row losses);
    # free_text: rows are prompt/response pairs (data.partition = length).
    "classify": ("labelled", "head"),
    "generate": ("labelled",),
    "sft": ("free_text",),
})


def make(name: str, tokenizer, label_names: list[str], max_length: int, run_cfg=None):
    task = TASKS.load(name)(tokenizer, label_names, max_length)
    task.run_cfg = run_cfg
    return task


def metric_label(record: dict | None = None) -> str:
    """What a record's test_accuracy measures ("accuracy", "rougeL", "exact match", ...), from the
    metric keys each task declares (``Task.metric_labels``); "accuracy" with no record."""
    for name in TASKS.names:
        for key, label in TASKS.load(name).metric_labels.items():
            if record and record.get(key) is not None:
                return label
    return "accuracy"


def short_label(label: str) -> str:
    """The console's form: "test acc", "test token acc", "test rougeL"."""
    return label.replace("accuracy", "acc")
