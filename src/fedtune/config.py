"""Typed run configuration: the one source of truth for every default.

A run is described by ``RunConfig``. It can be built from a preset (``demo`` or ``paper``),
a TOML/YAML file, and ``section.key=value`` overrides, applied in that order.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .errors import FedtuneError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass
class DataConfig:
    # Empty means: the shared Banking77 copy beside the checkout (see data.default_data_dir).
    path: str = ""
    # The pool of training rows is shuffled by seed; the public set is taken from its front and
    # the private set from its back, so sweeping public_size never changes the clients' data.
    # -1 = auto: the sizes follow the data when it is read (data.resolve_sizes, docs/sft.md), and
    # config.toml records the numbers chosen. Banking77 resolves to 500, 900 and 400.
    public_size: int = -1
    private_size: int = -1  # 0 = every row not in the public set
    test_size: int = -1  # 0 = the full test set; else a fixed, seeded subset
    max_length: int = 80
    padding: str = "dynamic"  # "dynamic" (pad per batch) or "max_length" (always max_length)
    partition: str = "iid"  # "iid" or "dirichlet"
    dirichlet_alpha: float = 0.5
    max_labels: int = 0  # 0 = all labels; N keeps the N most frequent (fast tests)
    text_column: str = "text"
    label_column: str = "category"
    # train.task=sft (sft_data.py): the prompt/response columns when their names are not recognised,
    # and the label-like column that partition=dirichlet spreads over clients.
    prompt_column: str = ""
    response_column: str = ""
    partition_column: str = ""
    # > 0: the public set is drawn with label y weighted exp(-public_skew * y / (labels - 1)), so its
    # label distribution is shifted from the private rows' (kd.align's setting; docs/kd.md).
    public_skew: float = 0.0
    # train.task=sft: the system turn of every prompt (training, evaluation, generate, export);
    # empty = none, not even the chat template's own default.
    system_prompt: str = ""


@dataclass
class ModelConfig:
    # "smollm2" (embedded, default), "minilm" (embedded), "tiny-gpt2"/"tiny-llama"/"tiny-bert"
    # (random init, for tests), a Hugging Face id, a local directory or a .gguf file.
    name: str = "smollm2"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_init: str = "gaussian"
    target_modules: list[str] = field(default_factory=list)  # empty = per-architecture default
    attn_implementation: str = "sdpa"
    quantize: str = ""  # "", "4bit" or "8bit": a frozen bitsandbytes base under LoRA (QLoRA); CUDA only
    # Tunable-parameter design (docs/peft.md).
    peft: str = "lora"  # "lora", "dora", "ia3", "prompt" (prompt tuning) or "prefix" (prefix tuning)
    virtual_tokens: int = 10  # prompt/prefix: learned tokens prepended to the input / to every layer's keys
    lora_scaling: str = "standard"  # "standard" (alpha/r) or "rslora" (alpha/sqrt(r))
    lora_freeze_a: bool = False  # FFA-LoRA: A stays at its seeded init; only B is trained and sent
    client_ranks: list[int] = field(default_factory=list)  # one LoRA rank per client; empty = lora_r for all
    # round -> LoRA rank from that round on, e.g. {1 = 2, 6 = 4}; keys are strings as in TOML
    rank_schedule: dict[str, int] = field(default_factory=dict)
    # A finished run directory whose final tunable state (LoRA + head, its adapter/) is the
    # global state before round 1 (a warm start; docs/zo.md); "" = the seeded initialisation.
    init_from: str = ""


@dataclass
class TrainConfig:
    task: str = "classify"  # tasks.TASKS: "classify" or "generate"
    local_epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    optimizer: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-3  # LoRA parameters
    head_lr: float = 1e-2  # the new classification head learns much faster at 10x the LoRA rate
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping
    device: str = "auto"  # "auto", "cpu", "cuda"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    bf16: bool = False  # bf16 autocast of the forward passes; CUDA only


@dataclass
class FedConfig:
    clients: int = 3
    rounds: int = 3
    fraction: float = 1.0  # fraction of clients sampled each round
    strategy: str = "fedavg"  # strategies.STRATEGIES: how the server aggregates tunable parameters
    client_timeout_s: float = 0.0  # used by distributed runtimes; 0 = wait forever
    # FedProx: clients minimise loss + prox_mu/2 ||w - w_global||^2 over the tunable parameters.
    prox_mu: float = 0.0
    # Server optimizers on the pseudo-gradient (docs/strategies.md): fedavgm, fedadam, fedyogi,
    # fedadagrad, and SCAFFOLD's global step size. fedavg ignores them.
    server_lr: float = 1.0  # adaptive strategies want ~1e-2..1e-1 (Reddi et al., 2021)
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam, fedyogi, fedadagrad (first moment)
    beta2: float = 0.99  # fedadam, fedyogi (second moment)
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity (added to sqrt(v))
    # Robust strategies (docs/privacy.md): trimmed_mean drops this fraction at each end per coordinate,
    # krum/multikrum assume up to krum_f Byzantine clients, norm_bound clips each update's L2 norm.
    trim_fraction: float = 0.2
    krum_f: int = 1
    norm_bound: float = 1.0
    # Simulated attackers: "" (none), sign_flip, scale, gaussian (model poisoning) or label_flip (data).
    attack: str = ""
    attack_scale: float = 10.0  # scale: the update's factor; gaussian: the noise's std in update RMS units
    malicious_clients: list[int] = field(default_factory=list)


@dataclass
class KDConfig:
    temperature: float = 2.0
    aggregation: str = "mean"  # "mean", "weighted" (by client samples) or "entropy"
    entropy_threshold: float = 0.0  # with "entropy": drop public samples above this (nats)
    server_epochs: int = 1
    server_lr: float = 1e-3
    client_eval_size: int = 200  # clients' own test accuracy on this many test rows
    logit_topk: int = 0  # 0 = send all logits
    logit_dtype: str = "fp32"  # fp32, fp16, int8
    client_kd_weight: float = 0.5  # lambda: client loss = lambda * KD (public) + (1 - lambda) * CE (private)
    confidence_weighting: bool = False  # weight each public row by 1 - H(teacher) / ln(width) (docs/kd.md)
    # Research directions (docs/kd.md, "Research directions").
    align: bool = False  # clients upload label histograms; the server weights public rows to their pooled distribution
    public_per_round: int = 0  # M public examples used and sent per round; 0 = all
    select: str = "random"  # how the M are chosen: "random", "entropy" or "disagreement"
    logit_rank: int = 0  # > 0: send a rank-k SVD code of the (row-centred) logits; 0 = off
    clusters: int = 2  # aggregation = "cluster": groups of clients by the similarity of their outputs
    # What a receiver of top-k probabilities does with the mass not sent: "bucket" keeps it as one
    # rest bucket in the KL; "uniform" spreads it evenly over the other entries (docs/kd.md).
    topk_tail: str = "bucket"
    align_clip: float = 2.0  # kd.align: cut each weight at this times the mean, then renormalise; 0 = no cut


@dataclass
class SplitConfig:
    # Transformer blocks (plus embeddings) kept on the client; 0 = auto (split_layer_for): 2, or
    # L-1 for models with fewer than 3 blocks (the tiny test models have 2).
    split_layer: int = 0
    samples_per_round: int = 0  # 0 = the client's whole shard each round
    act_dtype: str = "fp32"  # fp32, fp16, bf16, int8
    act_topk: float = 0.0  # 0 = dense; else the fraction of activation values kept
    # Research directions (docs/split.md, "Research directions").
    client_layers: list[int] = field(default_factory=list)  # one cut per client; empty = split_layer for all
    auto: bool = False  # pick each client's cut with the cost model (frameworks/split_plan.py) from client_profiles
    # One [flops_per_s, memory_mb, bandwidth_mbps] per client, read by auto.
    client_profiles: list[list[float]] = field(default_factory=list)
    server_flops_per_s: float = 1e13  # the server's speed in the cost model (per client it serves)
    act_budget_mb: float = 0.0  # > 0: each client's activation uploads per round fit this (frameworks/split_budget.py)
    sample: str = "random"  # which rows samples_per_round takes: "random" (seeded) or "loss" (highest first)


def split_layer_for(split_layer: int, depth: int) -> int:
    """The blocks a split-learning client keeps for a model of ``depth`` blocks: ``split_layer``,
    or with 0 (auto) 2, or depth-1 for shallower models so that the server keeps at least one."""
    return split_layer or min(2, depth - 1)


@dataclass
class ZOConfig:
    """Zeroth-order tuning with shared seeds (FedKSeed; docs/zo.md)."""

    seeds: int = 4096  # K: candidate seeds shared by server and clients (the history is at most K pairs)
    eps: float = 1e-3  # perturbation scale of the two-point estimate
    lr: float = 1e-3  # step size: w -= lr * g * z
    steps: int = 200  # zeroth-order steps per client per round (one batch each); 0 = one per batch for train.local_epochs
    params: str = "tunable"  # "tunable" (LoRA + head) or "all" (every parameter)


@dataclass
class FlowerConfig:
    """The Flower runtimes (docs/flower.md)."""

    # host:port of a running SuperLink; empty = start one and fed.clients SuperNodes on 127.0.0.1
    # (stopped after the run).
    superlink: str = ""
    root_certificates: str = ""  # CA certificate (PEM) of the SuperLink's TLS; empty with superlink = insecure
    local_tls: bool = True  # local SuperLink: serve TLS with a throwaway CA
    local_auth: bool = True  # local SuperLink: SuperNode authentication, local SuperNodes registered
    wait_nodes_s: float = 120.0  # how long the ServerApp waits for fed.clients SuperNodes (and their workers' models)
    sim_backend: str = "thread"  # flower-sim: "thread" (ClientApps in this process) or "ray" (flwr[simulation])
    # Split learning's per-batch channel (runtimes/channel.py), served by the ServerApp.
    channel_bind: str = "127.0.0.1:0"  # port 0 = any free port
    channel_host: str = ""  # the host clients dial; empty = the bind host
    channel_certfile: str = ""  # TLS for the channel; empty = plaintext
    channel_keyfile: str = ""
    channel_ca_certfile: str = ""  # sent to clients to verify the channel; empty = the certificate itself


@dataclass
class EvalConfig:
    """Evaluation of train.task=sft (tasks/sft.py)."""

    # "auto": final_number when every test response holds a '#### N' final answer (GSM8K), else
    # rougeL; "final_number": exact match of the final number; "rougeL": ROUGE-L F1; "none": no
    # generation (the metric is then the teacher-forced token accuracy).
    metric: str = "auto"
    samples: int = 0  # generated answers written per round to <run dir>/samples/round-NNN.jsonl
    generate_size: int = 0  # test rows answered by generation for the metric; 0 = every test row
    max_new_tokens: int = 256


@dataclass
class PrivacyConfig:
    """Differential privacy (docs/privacy.md). delta 0 = 1/n: n = a client's records for DP-SGD,
    the number of clients for central DP."""

    dp_sgd: bool = False  # record-level DP-SGD in every client's local training
    clip: float = 1.0  # per-example gradient L2 bound
    noise_multiplier: float = 1.0  # noise std / clip; ignored when target_epsilon > 0
    target_epsilon: float = 0.0  # > 0: calibrate the noise so the run ends at this epsilon
    delta: float = 0.0
    central_dp: bool = False  # client-level DP-FedAvg at the server
    update_clip: float = 1.0  # each client's update (state - global) L2 bound
    update_noise_multiplier: float = 1.0  # noise std on the sum / update_clip; target_epsilon calibrates it too
    # What kd and split send (public-set logits, activations at the cut): clipped and noised; 0 = off.
    output_noise_multiplier: float = 0.0
    output_clip: float = 1.0  # L2 bound of one example's activations (split) or one public row's logits (kd)
    # Secure aggregation (Flower's SecAgg+, Flower runtimes, fedavg): the server learns only the weighted mean.
    secagg: bool = False
    secagg_clip_range: float = 8.0  # each weighted upload value is clipped to +-this before quantization
    secagg_quantization_range: int = 4194304  # 2**22 integer levels over [-clip, clip]
    secagg_reconstruction_threshold: float = 0.5  # fraction of a client's shares that rebuild its secrets


@dataclass
class ContinualConfig:
    """Continual learning (docs/continual.md): the labels arrive in ``tasks`` groups over rounds."""

    tasks: int = 1  # T label groups, one after another; 1 = off
    rounds_per_task: int = 1  # rounds of each task; the last task also runs any rounds after T * this
    method: str = "none"  # "none", "ewc" (elastic weight consolidation) or "replay" (rows of past tasks)
    ewc_lambda: float = 100.0  # ewc: the penalty's weight, lambda/2 * sum F (w - w*)^2 per past task
    replay_per_task: int = 20  # replay: rows of each past task a client keeps and trains on again


@dataclass
class RunConfig:
    framework: str = "fedavg"  # frameworks.FRAMEWORKS: "fedavg", "kd", "split" or "zo"
    runtime: str = "inprocess"  # runtimes.RUNTIMES: "inprocess", "flower-sim" or "flower"
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])  # used by sweeps
    out: str = ""  # empty = runs/<framework>-<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)


# Presets are overrides on top of the dataclass defaults (which are the demo setting).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    # The case study of Yan et al. (GPT-2 + Banking77, section V), exactly.
    "paper": {
        "model.name": "gpt2",
        "model.lora_r": 8,
        "model.lora_alpha": 32,
        "model.lora_dropout": 0.1,
        "model.lora_init": "gaussian",
        "data.public_size": 5002,
        "data.private_size": 5001,
        "data.test_size": 0,
        "data.max_length": 80,
        "fed.clients": 3,
        "fed.rounds": 100,
        "train.local_epochs": 1,
        "train.optimizer": "adam",
        "train.lr": 1e-3,
        "train.head_lr": 1e-3,
        "seeds": [0, 1, 42],
    },
}


def _section_types(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def known_keys(cfg: RunConfig | None = None) -> list[str]:
    cfg = cfg or RunConfig()
    keys = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{g.name}" for g in fields(value)]
        else:
            keys.append(f.name)
    return keys


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn a TOML value or a command-line string into the field's declared type."""
    origin = getattr(typ, "__origin__", None)
    if origin is dict:  # "{1 = 2, 6 = 4}" or "1:2,6:4" on the command line, a table in TOML
        if isinstance(value, str):
            text = value.strip().strip("{}")
            pairs = [p.replace(":", "=").split("=", 1) for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise FedtuneError(f"config key {key!r}: expected {{round = rank, ...}}, got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict):
            raise FedtuneError(f"config key {key!r}: expected a table {{round = rank, ...}}, got {value!r}")
        try:
            return {str(int(str(k))): _coerce(key, typ.__args__[1], v) for k, v in value.items()}
        except ValueError:
            raise FedtuneError(f"config key {key!r}: table keys must be integers, got {list(value)}") from None
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = ast.literal_eval(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner,) = typ.__args__
        return [_coerce(key, inner, v) for v in value]
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise FedtuneError(f"config key {key!r}: expected {typ.__name__}, got {value!r}") from None
    return value


def set_key(cfg: RunConfig, key: str, value: Any) -> None:
    """Set ``section.key`` (or a top-level key) on ``cfg``, with type checking."""
    if key not in known_keys(cfg):
        close = difflib.get_close_matches(key, known_keys(cfg), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FedtuneError(f"unknown config key {key!r}{hint}")
    target: Any = cfg
    *path, name = key.split(".")
    for part in path:
        target = getattr(target, part)
    typ = _section_types(type(target))[name]
    setattr(target, name, _coerce(key, typ, value))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lora_r": 8}}`` -> ``{"model.lora_r": 8}``."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        # A table whose keys are all integers is a value (model.rank_schedule: round -> rank).
        if isinstance(v, dict) and not (v and all(str(key).lstrip("-").isdigit() for key in v)):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def read_tree(path: str | Path) -> dict[str, Any]:
    """A TOML or YAML file as nested tables; a one-line error naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FedtuneError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            tree = yaml.safe_load(text) or {}
        else:
            tree = tomllib.loads(text)
    except Exception as exc:  # both parsers raise their own error types
        raise FedtuneError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(tree, dict):
        raise FedtuneError(f"{path}: must be a table of sections")
    return tree


def read_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a flat ``{"section.key": value}`` dict."""
    return flatten(read_tree(path))


def flat_dict(cfg: RunConfig) -> dict[str, Any]:
    """Every key of ``cfg`` as ``{"section.key": value}``."""
    return flatten(to_dict(cfg))


def build_config(
    preset: str = "demo",
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    if preset not in PRESETS:
        raise FedtuneError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = RunConfig()
    layers = [PRESETS[preset]]
    if file:
        layers.append(read_file(file))
    layers.append(overrides or {})
    for layer in layers:
        for key, value in layer.items():
            set_key(cfg, key, value)
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise FedtuneError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FedtuneError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def validate(cfg: RunConfig) -> None:
    from .frameworks import FRAMEWORKS
    from .runtimes import RUNTIMES
    from .strategies import STRATEGIES
    from .tasks import TASKS

    FRAMEWORKS.check("framework", cfg.framework)
    RUNTIMES.check("runtime", cfg.runtime)
    STRATEGIES.check("fed.strategy", cfg.fed.strategy)
    TASKS.check("train.task", cfg.train.task)
    _one_of("data.padding", cfg.data.padding, ("dynamic", "max_length"))
    _one_of("data.partition", cfg.data.partition, ("iid", "dirichlet", "length"))
    _one_of("train.optimizer", cfg.train.optimizer, ("adam", "adamw"))
    _one_of("kd.aggregation", cfg.kd.aggregation, ("mean", "weighted", "entropy", "cluster"))
    _one_of("kd.logit_dtype", cfg.kd.logit_dtype, ("fp32", "fp16", "int8"))
    _one_of("split.act_dtype", cfg.split.act_dtype, ("fp32", "fp16", "bf16", "int8"))
    _one_of("flower.sim_backend", cfg.flower.sim_backend, ("thread", "ray"))
    positive = {
        "fed.clients": cfg.fed.clients,
        "fed.rounds": cfg.fed.rounds,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "data.max_length": cfg.data.max_length,
        "model.lora_r": cfg.model.lora_r,
    }
    for key, value in positive.items():
        if value < 1:
            raise FedtuneError(f"{key} must be >= 1; got {value}")
    if cfg.kd.temperature <= 0 or cfg.kd.logit_topk < 0 or cfg.kd.server_epochs < 0:
        raise FedtuneError("kd.temperature must be > 0; kd.logit_topk, kd.server_epochs >= 0")
    _one_of("kd.topk_tail", cfg.kd.topk_tail, ("bucket", "uniform"))
    if not 0.0 <= cfg.kd.client_kd_weight < 1.0:
        raise FedtuneError(f"kd.client_kd_weight must be in [0, 1) (0 = clients do not distil); got {cfg.kd.client_kd_weight}")
    if cfg.kd.aggregation == "entropy" and cfg.kd.entropy_threshold <= 0:
        raise FedtuneError("kd.aggregation=entropy needs kd.entropy_threshold > 0 (nats; ln(labels) keeps everything)")
    if not 0.0 < cfg.fed.fraction <= 1.0:
        raise FedtuneError(f"fed.fraction must be in (0, 1]; got {cfg.fed.fraction}")
    if cfg.data.max_labels < 0:
        raise FedtuneError("data.max_labels must be >= 0")
    _validate_sizes(cfg)
    if not 0.0 <= cfg.split.act_topk < 1.0:
        raise FedtuneError(f"split.act_topk must be in [0, 1) (0 = dense); got {cfg.split.act_topk}")
    if cfg.split.split_layer < 0:
        raise FedtuneError(f"split.split_layer must be >= 0 (0 = auto); got {cfg.split.split_layer}")
    if cfg.split.samples_per_round < 0:
        raise FedtuneError("split.samples_per_round must be >= 0 (0 = the whole shard)")
    _validate_sft_and_gpu(cfg)
    _validate_zo(cfg)
    _validate_strategy(cfg)
    _validate_peft(cfg)
    _validate_privacy(cfg)
    _validate_secagg(cfg)
    _validate_split_directions(cfg)
    _validate_kd_directions(cfg)
    _validate_continual(cfg)
    _validate_init_from(cfg)


def _validate_sizes(cfg: RunConfig) -> None:
    for key in ("public_size", "private_size", "test_size"):
        if getattr(cfg.data, key) < -1:
            raise FedtuneError(f"data.{key} must be >= 0, or -1 for auto")


def _validate_sft_and_gpu(cfg: RunConfig) -> None:
    _one_of("eval.metric", cfg.eval.metric, ("auto", "final_number", "rougeL", "none"))
    _one_of("model.quantize", cfg.model.quantize, ("", "4bit", "8bit"))
    if cfg.data.partition == "length" and cfg.train.task != "sft":
        raise FedtuneError(f"data.partition=length needs train.task=sft; got train.task={cfg.train.task!r}")
    for key in ("eval.samples", "eval.generate_size"):
        if getattr(cfg.eval, key.split(".")[1]) < 0:
            raise FedtuneError(f"{key} must be >= 0")
    if cfg.eval.max_new_tokens < 1:
        raise FedtuneError(f"eval.max_new_tokens must be >= 1; got {cfg.eval.max_new_tokens}")
    wants = [k for k, on in (("train.bf16=true", cfg.train.bf16), (f"model.quantize={cfg.model.quantize}", cfg.model.quantize)) if on]
    if wants and cfg.train.device != "cuda":
        import torch  # only when asked: validation otherwise stays free of torch

        if cfg.train.device != "auto" or not torch.cuda.is_available():
            raise FedtuneError(f"{wants[0]} needs a CUDA GPU (none found, or train.device={cfg.train.device})")


def _validate_zo(cfg: RunConfig) -> None:
    zo = cfg.zo
    _one_of("zo.params", zo.params, ("tunable", "all"))
    if not 1 <= zo.seeds <= 2**31 - 1:  # seed indices travel as int32
        raise FedtuneError(f"zo.seeds must be in [1, 2**31 - 1]; got {zo.seeds}")
    for key, value in (("zo.eps", zo.eps), ("zo.lr", zo.lr)):
        if not value > 0 or value == float("inf"):
            raise FedtuneError(f"{key} must be a finite number > 0; got {value}")
    if zo.steps < 0:
        raise FedtuneError(f"zo.steps must be >= 0 (0 = one step per batch); got {zo.steps}")
    if cfg.framework == "zo" and cfg.fed.strategy != "fedavg":
        raise FedtuneError(f"fed.strategy={cfg.fed.strategy!r} aggregates uploaded weights; zo uploads seed pairs "
                           "and sums them weighted by samples: leave fed.strategy = fedavg")


def _validate_strategy(cfg: RunConfig) -> None:
    f = cfg.fed
    if cfg.privacy.dp_sgd and f.strategy == "scaffold":
        # SCAFFOLD's client variate is built from raw local gradients: it would leak past DP-SGD.
        raise FedtuneError("privacy.dp_sgd does not combine with fed.strategy=scaffold (its client variate "
                           "comes from un-noised gradients)")
    if f.prox_mu < 0:
        raise FedtuneError(f"fed.prox_mu must be >= 0 (0 = no proximal term); got {f.prox_mu}")
    if f.server_lr <= 0:
        raise FedtuneError(f"fed.server_lr must be > 0; got {f.server_lr}")
    for key in ("server_momentum", "beta1", "beta2"):
        if not 0.0 <= getattr(f, key) < 1.0:
            raise FedtuneError(f"fed.{key} must be in [0, 1); got {getattr(f, key)}")
    if f.tau <= 0:
        raise FedtuneError(f"fed.tau must be > 0; got {f.tau}")
    if cfg.framework == "kd" and (f.strategy != "fedavg" or f.prox_mu):
        raise FedtuneError(f"fed.strategy={f.strategy} and fed.prox_mu act on uploaded tunable parameters, "
                           "which kd does not send; use framework fedavg or split")


PEFT_METHODS = ("lora", "dora", "ia3", "prompt", "prefix")
# Which methods fit split learning's cut: per-layer adapters on either side, a prompt on the client.
SPLIT_PEFT = ("lora", "dora", "ia3", "prompt")
# Strategies that aggregate clients of different LoRA ranks.
RANK_STRATEGIES = ("hetlora", "flexlora", "flora")


def _validate_peft(cfg: RunConfig) -> None:
    m = cfg.model
    _one_of("model.peft", m.peft, PEFT_METHODS)
    _one_of("model.lora_scaling", m.lora_scaling, ("standard", "rslora"))
    lora = m.peft in ("lora", "dora")
    if cfg.framework == "split" and m.peft not in SPLIT_PEFT:
        raise FedtuneError(f"model.peft={m.peft} does not fit split learning's cut; split takes {', '.join(SPLIT_PEFT)}")
    if m.peft in ("prompt", "prefix") and cfg.train.task != "classify":
        # The generate task reads the base model's hidden states directly, past PEFT's forward.
        raise FedtuneError(f"model.peft={m.peft} needs train.task=classify; got {cfg.train.task!r}")
    if m.peft in ("prompt", "prefix") and m.virtual_tokens < 1:
        raise FedtuneError(f"model.virtual_tokens must be >= 1 with model.peft={m.peft}; got {m.virtual_tokens}")
    if m.lora_freeze_a and not lora:
        raise FedtuneError(f"model.lora_freeze_a applies to lora and dora; got model.peft={m.peft}")
    if m.client_ranks and len(m.client_ranks) != cfg.fed.clients:
        raise FedtuneError(
            f"model.client_ranks needs one rank per client (fed.clients={cfg.fed.clients}); got {len(m.client_ranks)}")
    ranks = list(m.client_ranks) + list(m.rank_schedule.values())
    if any(r < 1 for r in ranks):
        raise FedtuneError(f"LoRA ranks must be >= 1; got model.client_ranks={m.client_ranks}, "
                           f"model.rank_schedule={m.rank_schedule}")
    if m.client_ranks and (not lora or cfg.framework not in ("fedavg", "kd")):
        raise FedtuneError(f"model.client_ranks needs framework=fedavg or kd with model.peft=lora or dora; "
                           f"got framework={cfg.framework}, model.peft={m.peft}")
    if m.rank_schedule and (not lora or cfg.framework != "fedavg"):
        raise FedtuneError(f"model.rank_schedule needs framework=fedavg with model.peft=lora or dora; "
                           f"got framework={cfg.framework}, model.peft={m.peft}")
    if m.client_ranks and m.rank_schedule:
        raise FedtuneError("set model.client_ranks or model.rank_schedule, not both")
    if m.rank_schedule:
        rounds = sorted(int(k) for k in m.rank_schedule)
        if rounds[0] != 1 or any(
                m.rank_schedule[str(b)] < m.rank_schedule[str(a)] for a, b in zip(rounds, rounds[1:])):
            raise FedtuneError(f"model.rank_schedule must start at round 1 and never lower the rank; "
                               f"got {m.rank_schedule}")
    if cfg.fed.strategy in RANK_STRATEGIES and (not lora or cfg.framework != "fedavg" or m.lora_freeze_a):
        raise FedtuneError(f"fed.strategy={cfg.fed.strategy} aggregates LoRA factors: it needs framework=fedavg, "
                           f"model.peft=lora or dora and model.lora_freeze_a=false")
    if len(set(m.client_ranks)) > 1 and cfg.framework == "fedavg" and cfg.fed.strategy not in RANK_STRATEGIES:
        raise FedtuneError(f"clients of different ranks (model.client_ranks={m.client_ranks}) need fed.strategy "
                           f"{', '.join(RANK_STRATEGIES)}; got {cfg.fed.strategy!r}")
    if (m.client_ranks or m.rank_schedule or cfg.fed.strategy in RANK_STRATEGIES) and (
            cfg.fed.prox_mu or cfg.fed.strategy == "scaffold"):
        # Their client-side terms are shaped like the global state, which then differs per client.
        raise FedtuneError("fed.prox_mu and fed.strategy=scaffold do not combine with heterogeneous or scheduled ranks")
    if cfg.fed.strategy == "flora" and cfg.fed.fraction < 1.0:
        raise FedtuneError("fed.strategy=flora needs fed.fraction=1: every client merges every round's stacked adapter")


ATTACKS = ("sign_flip", "scale", "gaussian", "label_flip")


def _validate_privacy(cfg: RunConfig) -> None:
    """The privacy section and the robustness keys of fed (docs/privacy.md)."""
    f, p = cfg.fed, cfg.privacy
    if f.attack and f.attack not in ATTACKS:
        raise FedtuneError(f"fed.attack must be empty or one of {', '.join(ATTACKS)}; got {f.attack!r}")
    bad = [c for c in f.malicious_clients if not 0 <= c < f.clients]
    if bad:
        raise FedtuneError(f"fed.malicious_clients must be client ids in [0, {f.clients}); got {bad}")
    if len(set(f.malicious_clients)) >= f.clients:
        raise FedtuneError(f"fed.malicious_clients must name fewer clients than fed.clients={f.clients}; "
                           f"got {len(set(f.malicious_clients))}")
    if bool(f.attack) != bool(f.malicious_clients):
        raise FedtuneError("fed.attack and fed.malicious_clients go together: set both or neither")
    if f.attack in ("sign_flip", "scale", "gaussian") and cfg.framework == "kd":
        raise FedtuneError(f"fed.attack={f.attack} poisons uploaded weights; kd uploads outputs: use label_flip")
    if f.attack_scale <= 0:
        raise FedtuneError(f"fed.attack_scale must be > 0; got {f.attack_scale}")
    if not 0.0 <= f.trim_fraction < 0.5:
        raise FedtuneError(f"fed.trim_fraction must be in [0, 0.5); got {f.trim_fraction}")
    if f.norm_bound <= 0:
        raise FedtuneError(f"fed.norm_bound must be > 0; got {f.norm_bound}")
    sampled = max(1, round(f.fraction * f.clients))
    if f.krum_f < 0 or (f.strategy in ("krum", "multikrum") and sampled < 2 * f.krum_f + 3):
        raise FedtuneError(f"fed.strategy={f.strategy} with fed.krum_f={f.krum_f} needs >= {2 * f.krum_f + 3} "
                           f"sampled clients (2f+3); got {sampled}")
    for key, value in (("privacy.clip", p.clip), ("privacy.update_clip", p.update_clip),
                       ("privacy.output_clip", p.output_clip)):
        if not value > 0:
            raise FedtuneError(f"{key} must be > 0 (an L2 bound); got {value}")
    for key, value in (("privacy.noise_multiplier", p.noise_multiplier),
                       ("privacy.update_noise_multiplier", p.update_noise_multiplier),
                       ("privacy.target_epsilon", p.target_epsilon),
                       ("privacy.output_noise_multiplier", p.output_noise_multiplier)):
        if value < 0:
            raise FedtuneError(f"{key} must be >= 0; got {value}")
    if not 0.0 <= p.delta < 1.0:
        raise FedtuneError(f"privacy.delta must be in [0, 1) (0 = 1/n); got {p.delta}")
    if p.output_noise_multiplier and cfg.framework == "fedavg":
        raise FedtuneError("privacy.output_noise_multiplier noises what kd and split send; fedavg sends weights "
                           "(use privacy.dp_sgd or privacy.central_dp)")
    if p.central_dp and cfg.framework == "kd":
        raise FedtuneError("privacy.central_dp bounds uploaded weight updates; kd uploads outputs (use privacy.dp_sgd)")


SECAGG_MODULUS = 2**32  # SecAgg+'s mask range (Flower's default and maximum): sums wrap modulo this


def _validate_secagg(cfg: RunConfig) -> None:
    """privacy.secagg: Flower's SecAgg+ hands the server one weighted mean (docs/privacy.md)."""
    p, f = cfg.privacy, cfg.fed
    if not p.secagg:
        return
    if cfg.runtime == "inprocess":
        raise FedtuneError("privacy.secagg runs Flower's SecAgg+: use --runtime flower-sim or flower (got inprocess)")
    if cfg.framework != "fedavg":
        raise FedtuneError(f"privacy.secagg gives the server only the sum of weight updates: it needs framework=fedavg "
                           f"({cfg.framework} needs each client's own upload)")
    if f.strategy != "fedavg":
        raise FedtuneError(f"privacy.secagg gives the server only the weighted mean: fed.strategy={f.strategy} needs "
                           f"each client's own update (use fed.strategy=fedavg)")
    if p.central_dp:
        raise FedtuneError("privacy.central_dp clips each client's update, which privacy.secagg hides from the server")
    if cfg.model.client_ranks:
        raise FedtuneError("privacy.secagg sums equal-shaped updates: model.client_ranks gives clients different shapes")
    sampled = max(1, round(f.fraction * f.clients))
    if sampled < 2:
        raise FedtuneError(f"privacy.secagg needs >= 2 sampled clients (a sum of one is the update); got {sampled}")
    if not p.secagg_clip_range > 0:
        raise FedtuneError(f"privacy.secagg_clip_range must be > 0; got {p.secagg_clip_range}")
    if not 0 < p.secagg_quantization_range < SECAGG_MODULUS // sampled:
        raise FedtuneError(f"privacy.secagg_quantization_range must be in [1, 2**32 / sampled clients = "
                           f"{SECAGG_MODULUS // sampled}) so the sum cannot wrap; got {p.secagg_quantization_range}")
    if not 0 < p.secagg_reconstruction_threshold <= 1:
        raise FedtuneError(f"privacy.secagg_reconstruction_threshold must be in (0, 1] (a fraction of the shares); "
                           f"got {p.secagg_reconstruction_threshold}")


def _validate_kd_directions(cfg: RunConfig) -> None:
    """kd's research directions (docs/kd.md) and the public set's label shift they are measured on."""
    kd, d = cfg.kd, cfg.data
    _one_of("kd.select", kd.select, ("random", "entropy", "disagreement"))
    if kd.public_per_round < 0 or 0 <= d.public_size < kd.public_per_round:  # auto (-1): checked once resolved
        raise FedtuneError(f"kd.public_per_round must be in [0, data.public_size={d.public_size}] (0 = all); "
                           f"got {kd.public_per_round}")
    if kd.select != "random" and not kd.public_per_round:
        raise FedtuneError(f"kd.select={kd.select} chooses among public rows: it needs kd.public_per_round > 0")
    if kd.logit_rank < 0:
        raise FedtuneError(f"kd.logit_rank must be >= 0 (0 = off); got {kd.logit_rank}")
    if kd.logit_rank and kd.logit_topk:
        raise FedtuneError(f"kd.logit_rank={kd.logit_rank} codes the dense logits; it does not combine with "
                           f"kd.logit_topk={kd.logit_topk} (set one of them to 0)")
    if kd.clusters < 1 or (kd.aggregation == "cluster" and kd.clusters > cfg.fed.clients):
        raise FedtuneError(f"kd.clusters must be in [1, fed.clients={cfg.fed.clients}]; got {kd.clusters}")
    if not 0.0 <= d.public_skew < float("inf"):
        raise FedtuneError(f"data.public_skew must be a finite number >= 0 (0 = no shift); got {d.public_skew}")
    for key, on in (("kd.align", kd.align), ("data.public_skew", d.public_skew)):
        if on and cfg.train.task == "sft":
            raise FedtuneError(f"{key} works on labelled rows (train.task classify or generate); got train.task=sft")
    # kd.align_clip: a value other than the default does nothing without kd.align.
    clip, default = kd.align_clip, KDConfig.align_clip
    if not 0.0 <= clip < float("inf"):
        raise FedtuneError(f"kd.align_clip must be a finite number >= 0 (times the mean weight; 0 = no clipping); "
                           f"got {clip}")
    if clip != default and not kd.align:
        raise FedtuneError(f"kd.align_clip={clip} clips kd.align's weights: it needs kd.align = true")


def _validate_continual(cfg: RunConfig) -> None:
    c = cfg.continual
    _one_of("continual.method", c.method, ("none", "ewc", "replay"))
    if c.tasks < 1 or c.rounds_per_task < 1:
        raise FedtuneError(f"continual.tasks and continual.rounds_per_task must be >= 1; got {c.tasks}, "
                           f"{c.rounds_per_task}")
    if not 0.0 <= c.ewc_lambda < float("inf"):
        raise FedtuneError(f"continual.ewc_lambda must be a finite number >= 0; got {c.ewc_lambda}")
    if c.replay_per_task < 0 or (c.method == "replay" and c.replay_per_task < 1):
        raise FedtuneError(f"continual.replay_per_task must be >= 1 with continual.method=replay (>= 0 otherwise); "
                           f"got {c.replay_per_task}")
    if c.tasks == 1:
        if c.method != "none":
            raise FedtuneError(f"continual.method={c.method} needs continual.tasks > 1 (1 = continual learning off)")
        return
    if cfg.framework not in ("fedavg", "kd", "split"):
        raise FedtuneError(f"continual.tasks > 1 runs under framework fedavg, kd or split; got {cfg.framework!r}")
    if cfg.train.task not in ("classify", "generate"):
        raise FedtuneError(f"continual.tasks > 1 splits the labels of train.task classify or generate; "
                           f"got {cfg.train.task!r}")
    if 0 < cfg.data.max_labels < c.tasks:
        raise FedtuneError(f"continual.tasks={c.tasks} needs at least as many labels; data.max_labels="
                           f"{cfg.data.max_labels}")
    if cfg.fed.rounds < c.tasks * c.rounds_per_task:
        raise FedtuneError(f"fed.rounds={cfg.fed.rounds} leaves tasks unseen: continual.tasks * "
                           f"continual.rounds_per_task = {c.tasks * c.rounds_per_task}")
    if c.method != "none" and cfg.fed.fraction < 1.0:
        # Each client keeps its Fisher or replay rows when a task ends: it must take part in that round.
        raise FedtuneError(f"continual.method={c.method} needs fed.fraction=1 (every client closes each task); "
                           f"got {cfg.fed.fraction}")
    if c.method == "ewc" and (cfg.privacy.dp_sgd or cfg.privacy.output_noise_multiplier):
        raise FedtuneError("continual.method=ewc does not combine with privacy.dp_sgd or privacy.output_noise_multiplier "
                           "(its Fisher pass uses un-noised gradients and activations)")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    for key, value in flatten(tree).items():
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def save(cfg: RunConfig, path: str | Path) -> None:
    import tomli_w

    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))


def _validate_split_directions(cfg: RunConfig) -> None:
    """split.client_layers, auto, client_profiles, server_flops_per_s, act_budget_mb, sample (docs/split.md)."""
    s, clients = cfg.split, cfg.fed.clients
    _one_of("split.sample", s.sample, ("random", "loss"))
    if s.client_layers and len(s.client_layers) != clients:
        raise FedtuneError(f"split.client_layers needs one cut per client (fed.clients={clients}); "
                           f"got {len(s.client_layers)}: {s.client_layers}")
    if any(c < 1 for c in s.client_layers):
        raise FedtuneError(f"split.client_layers must be cuts >= 1 (blocks kept by each client); got {s.client_layers}")
    if s.auto and s.client_layers:
        raise FedtuneError("set split.client_layers or split.auto=true, not both")
    if s.client_profiles and not s.auto:
        raise FedtuneError("split.client_profiles is read by split.auto=true only; set split.auto=true or drop it")
    if s.auto and len(s.client_profiles) != clients:
        raise FedtuneError(f"split.auto=true needs split.client_profiles: one [flops_per_s, memory_mb, "
                           f"bandwidth_mbps] per client (fed.clients={clients}); got {len(s.client_profiles)}")
    for cid, p in enumerate(s.client_profiles):
        if len(p) != 3 or not all(0 < v < float("inf") for v in p):
            raise FedtuneError(f"split.client_profiles[{cid}] must be [flops_per_s, memory_mb, bandwidth_mbps], "
                               f"three finite numbers > 0; got {p}")
    if not 0 < s.server_flops_per_s < float("inf"):
        raise FedtuneError(f"split.server_flops_per_s must be a finite number > 0; got {s.server_flops_per_s}")
    if not 0 <= s.act_budget_mb < float("inf"):
        raise FedtuneError(f"split.act_budget_mb must be >= 0 (0 = off); got {s.act_budget_mb}")
    if s.act_budget_mb and (s.act_dtype != "fp32" or s.act_topk):
        raise FedtuneError("split.act_budget_mb chooses the precision and top-k per batch: leave split.act_dtype=fp32 "
                           f"and split.act_topk=0; got act_dtype={s.act_dtype}, act_topk={s.act_topk}")
    if s.sample == "loss" and cfg.train.task != "classify":
        raise FedtuneError(f"split.sample=loss ranks rows by their classification loss: needs train.task=classify; "
                           f"got {cfg.train.task!r}")
    if s.auto or len(set(s.client_layers)) > 1:
        # Clients then hold different tensors: aggregated per block (split.py), a plain sample-weighted mean.
        other = [f"fed.strategy={cfg.fed.strategy}" if cfg.fed.strategy != "fedavg" else "",
                 "fed.prox_mu" if cfg.fed.prox_mu else "", "privacy.central_dp" if cfg.privacy.central_dp else "",
                 "model.peft=prompt" if cfg.model.peft == "prompt" else ""]
        other = [o for o in other if o]
        if other:
            raise FedtuneError(f"clients with different cuts (split.client_layers / split.auto) are averaged block by "
                               f"block with fed.strategy=fedavg; {other[0]} does not combine with them")


def _validate_init_from(cfg: RunConfig) -> None:
    # The rest (a finished run, the same model, task, labels and tensor shapes) is checked where
    # the state loads (use.warm_start): a sweep may name a run that an earlier cell writes.
    init = cfg.model.init_from
    if init and cfg.out and Path(init).resolve() == Path(cfg.out).resolve():
        raise FedtuneError(f"model.init_from={init} is this run's own directory (out); name another, finished run")
