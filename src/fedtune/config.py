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
    public_size: int = 500
    private_size: int = 900  # 0 = every row not in the public set
    test_size: int = 400  # 0 = the full test set; else a fixed, seeded subset
    max_length: int = 80
    padding: str = "dynamic"  # "dynamic" (pad per batch) or "max_length" (always max_length)
    partition: str = "iid"  # "iid" or "dirichlet"
    dirichlet_alpha: float = 0.5
    max_labels: int = 0  # 0 = all labels; N keeps the N most frequent (fast tests)
    text_column: str = "text"
    label_column: str = "category"


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


@dataclass
class FedConfig:
    clients: int = 3
    rounds: int = 3
    fraction: float = 1.0  # fraction of clients sampled each round
    strategy: str = "fedavg"  # strategies.STRATEGIES: how the server aggregates tunable parameters
    client_timeout_s: float = 0.0  # used by distributed runtimes; 0 = wait forever


@dataclass
class KDConfig:
    temperature: float = 2.0
    aggregation: str = "mean"  # "mean", "weighted" (by client samples) or "entropy"
    entropy_threshold: float = 0.0  # with "entropy": drop public samples above this (nats)
    server_epochs: int = 1
    server_lr: float = 1e-3
    client_kd_epochs: int = 1
    client_eval_size: int = 200  # clients' own test accuracy on this many test rows
    logit_topk: int = 0  # 0 = send all logits
    logit_dtype: str = "fp32"  # fp32, fp16, int8


@dataclass
class SplitConfig:
    split_layer: int = 2  # transformer blocks (plus embeddings) kept on the client
    samples_per_round: int = 0  # 0 = the client's whole shard each round
    act_dtype: str = "fp32"  # fp32, fp16, bf16, int8
    act_topk: float = 0.0  # 0 = dense; else the fraction of activation values kept


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
class RunConfig:
    framework: str = "fedavg"  # frameworks.FRAMEWORKS: "fedavg", "kd" or "split"
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
        if isinstance(v, dict):
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
    _one_of("data.partition", cfg.data.partition, ("iid", "dirichlet"))
    _one_of("train.optimizer", cfg.train.optimizer, ("adam", "adamw"))
    _one_of("kd.aggregation", cfg.kd.aggregation, ("mean", "weighted", "entropy"))
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
    if cfg.kd.temperature <= 0 or cfg.kd.logit_topk < 0 or cfg.kd.server_epochs < 0 or cfg.kd.client_kd_epochs < 0:
        raise FedtuneError("kd.temperature must be > 0; kd.logit_topk, kd.server_epochs, kd.client_kd_epochs >= 0")
    if cfg.kd.aggregation == "entropy" and cfg.kd.entropy_threshold <= 0:
        raise FedtuneError("kd.aggregation=entropy needs kd.entropy_threshold > 0 (nats; ln(labels) keeps everything)")
    if not 0.0 < cfg.fed.fraction <= 1.0:
        raise FedtuneError(f"fed.fraction must be in (0, 1]; got {cfg.fed.fraction}")
    for key in ("data.public_size", "data.private_size", "data.test_size", "data.max_labels"):
        if dataclasses.asdict(cfg)[key.split(".")[0]][key.split(".")[1]] < 0:
            raise FedtuneError(f"{key} must be >= 0")
    if not 0.0 <= cfg.split.act_topk < 1.0:
        raise FedtuneError(f"split.act_topk must be in [0, 1) (0 = dense); got {cfg.split.act_topk}")
    if cfg.split.samples_per_round < 0:
        raise FedtuneError("split.samples_per_round must be >= 0 (0 = the whole shard)")


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
