"""The data, training and evaluation sections, which every framework reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FedtuneError
from ..tasks import TASKS
from .checks import at_least_one, one_of


@dataclass
class DataConfig:
    # Empty means: the shared Banking77 copy beside the checkout (see data.default_data_dir) for
    # classify and generate; train.task=sft needs a path (a file or a directory; sft_data.py).
    path: str = ""
    # The pool of training rows is shuffled by seed; the public set is taken from its front and
    # the private set from its back, so sweeping public_size never changes the clients' data.
    # -1 = auto: the sizes follow the data when it is read (data.resolve_sizes, docs/sft.md), and
    # config.toml records the numbers chosen. Banking77 resolves to 500, 900 and 400.
    public_size: int = -1
    private_size: int = -1  # 0 = every row not in the public set
    test_size: int = -1  # 0 = the full test set; else a fixed, seeded subset
    # Validation rows held out of the training pool (seeded by seed), disjoint from the public,
    # private and test rows; every evaluated round then records val_<metric> (0 = none).
    val_size: int = 0
    # > 0: rows per client held out of its own shard as its own test set (data.hold_out): client
    # records carry client_test_accuracy of the model that client uses (docs/personalization.md).
    client_test_size: int = 0
    max_length: int = 80  # tokens per row; longer rows are truncated
    padding: str = "dynamic"  # "dynamic" (pad per batch) or "max_length" (always max_length)
    # "iid", "dirichlet" (label skew, dirichlet_alpha) or "length" (train.task=sft: by response length)
    partition: str = "iid"
    dirichlet_alpha: float = 0.5  # partition=dirichlet: smaller = more skewed labels per client
    max_labels: int = 0  # 0 = all labels; N keeps the N most frequent (fast tests)
    text_column: str = "text"  # the CSV column holding the input text
    label_column: str = "category"  # the CSV column holding the label
    # train.task=sft (sft_data.py): the prompt/response columns when their names are not recognised,
    # and the label-like column that partition=dirichlet spreads over clients.
    prompt_column: str = ""
    response_column: str = ""  # train.task=sft: the response column when its name is not recognised
    partition_column: str = ""  # train.task=sft: the label-like column partition=dirichlet spreads
    # > 0: the public set is drawn with label y weighted exp(-public_skew * y / (labels - 1)), so its
    # label distribution is shifted from the private rows' (kd.align's setting; docs/kd.md).
    public_skew: float = 0.0
    # train.task=sft: the system turn of every prompt (training, evaluation, generate, export);
    # empty = none, not even the chat template's own default.
    system_prompt: str = ""


@dataclass
class TrainConfig:
    task: str = "classify"  # tasks.TASKS: "classify", "generate" or "sft"
    local_epochs: int = 1  # passes over its private rows each client makes per round
    batch_size: int = 16  # training rows per step
    eval_batch_size: int = 64  # rows per forward pass in evaluation
    optimizer: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-3  # the PEFT parameters (LoRA, DoRA, IA3, prompt or prefix)
    head_lr: float = 1e-2  # the new classification head learns much faster at 10x the PEFT rate
    weight_decay: float = 0.0  # the optimizer's weight decay
    max_grad_norm: float = 0.0  # 0 = no clipping
    device: str = "auto"  # "auto", "cpu", "cuda"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # "fp32", "bf16" (the frozen base stored and computed in bf16; the tunable parameters, their
    # gradients and the optimizer state stay fp32; precision.py) or "auto" (bf16 where the hardware
    # computes it natively: a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16; else fp32).
    # config.toml records the choice. train.bf16=true is accepted as train.precision=bf16.
    precision: str = "fp32"
    # torch.compile the client model once, reused by every client and round (docs in README's
    # "Precision and speed"): the first steps pay the compile, new padded lengths may recompile.
    compile: bool = False


@dataclass
class EvalConfig:
    """When and on which test rows the server model is evaluated; the generation settings of
    train.task=sft (tasks/sft.py)."""

    # "auto": final_number when every test response holds a '#### N' final answer (GSM8K), else
    # rougeL; "final_number": exact match of the final number; "rougeL": ROUGE-L F1; "none": no
    # generation (the metric is then the teacher-forced token accuracy).
    metric: str = "auto"
    samples: int = 0  # generated answers written per round to <run dir>/samples/round-NNN.jsonl
    generate_size: int = 0  # test rows answered by generation for the metric; 0 = every test row
    max_new_tokens: int = 256  # the longest generated answer, in tokens
    # The curve: the test rows are measured every K rounds (and the validation rows with them); the
    # last round always, on the whole test set (evalsets.py).
    every: int = 1
    curve_size: int = 0  # test rows of the curve's rounds: a fixed seeded subset; 0 = the whole test set


def validate(cfg: Any) -> None:
    """data, train and eval."""
    d, t, e = cfg.data, cfg.train, cfg.eval
    TASKS.check("train.task", t.task)
    one_of("data.padding", d.padding, ("dynamic", "max_length"))
    one_of("data.partition", d.partition, ("iid", "dirichlet", "length"))
    one_of("train.optimizer", t.optimizer, ("adam", "adamw"))
    one_of("train.precision", t.precision, ("auto", "fp32", "bf16"))
    at_least_one({"train.batch_size": t.batch_size, "train.eval_batch_size": t.eval_batch_size,
                  "data.max_length": d.max_length})
    if d.max_labels < 0:
        raise FedtuneError("data.max_labels must be >= 0")
    if d.client_test_size < 0:
        raise FedtuneError(f"data.client_test_size must be >= 0 (0 = no client test rows); got {d.client_test_size}")
    for key in ("public_size", "private_size", "test_size"):
        if getattr(d, key) < -1:
            raise FedtuneError(f"data.{key} must be >= 0, or -1 for auto")
    if not 0.0 <= d.public_skew < float("inf"):
        raise FedtuneError(f"data.public_skew must be a finite number >= 0 (0 = no shift); got {d.public_skew}")
    one_of("eval.metric", e.metric, ("auto", "final_number", "rougeL", "none"))
    if d.val_size < 0:
        raise FedtuneError(f"data.val_size must be >= 0 (0 = no validation rows); got {d.val_size}")
    if e.every < 1 or e.curve_size < 0:
        raise FedtuneError(f"eval.every must be >= 1 and eval.curve_size >= 0; got {e.every} and {e.curve_size}")
    for key in ("samples", "generate_size"):
        if getattr(e, key) < 0:
            raise FedtuneError(f"eval.{key} must be >= 0")
    if e.max_new_tokens < 1:
        raise FedtuneError(f"eval.max_new_tokens must be >= 1; got {e.max_new_tokens}")


def check_cuda(cfg: Any) -> None:
    """model.quantize runs on a CUDA GPU only."""
    wants = [f"model.quantize={cfg.model.quantize}"] if cfg.model.quantize else []
    if wants and cfg.train.device != "cuda":
        import torch  # only when asked: validation otherwise stays free of torch

        if cfg.train.device != "auto" or not torch.cuda.is_available():
            raise FedtuneError(f"{wants[0]} needs a CUDA GPU (none found, or train.device={cfg.train.device})")
