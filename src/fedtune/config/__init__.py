"""Typed run configuration: the one source of truth for every default.

A run is described by ``RunConfig``. It can be built from a preset (``demo`` or ``paper``),
a TOML/YAML file, and ``section.key=value`` overrides, applied in that order (load.py).

Each section lives with its own checks in one module per family (core: data, train, eval;
peft: model; fed; kd; split; zo; privacy, with secure aggregation; continual; flower). Each
family's ``validate(cfg)`` reads the whole ``RunConfig`` but checks its own keys; the rules
across families are one table over registry traits (rules.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FedtuneError
from ..frameworks import FRAMEWORKS
from ..runtimes import RUNTIMES
from . import continual, core, fed, flower, kd, peft, privacy, rules, split, zo
from .continual import ContinualConfig
from .core import DataConfig, EvalConfig, TrainConfig
from .fed import FedConfig
from .flower import FlowerConfig
from .kd import KDConfig
from .load import flatten, parse_overrides, read_file, read_tree, set_key
from .load import known_keys as _known_keys
from .peft import ModelConfig
from .privacy import PrivacyConfig
from .split import SplitConfig, split_layer_for
from .zo import ZOConfig

__all__ = [
    "ContinualConfig", "DataConfig", "EvalConfig", "FedConfig", "FlowerConfig", "KDConfig", "ModelConfig",
    "PRESETS", "PrivacyConfig", "RunConfig", "SplitConfig", "TrainConfig", "ZOConfig", "build_config",
    "flat_dict", "flatten", "from_dict", "known_keys", "parse_overrides", "read_file", "read_tree", "save",
    "set_key", "split_layer_for", "to_dict", "validate",
]


@dataclass
class RunConfig:
    framework: str = "fedavg"  # frameworks.FRAMEWORKS: "fedavg", "kd", "split" or "zo"
    runtime: str = "inprocess"  # runtimes.RUNTIMES: "inprocess", "flower-sim" or "flower"
    seed: int = 0  # seeds data shuffling, partition, init and sampling
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

# Each family checks its own keys; the cross-family rules then read valid names only.
FAMILIES = (core, peft, fed, kd, split, zo, privacy, continual, flower)


def validate(cfg: RunConfig) -> None:
    """Every family's own checks, then the rules across families (rules.py)."""
    FRAMEWORKS.check("framework", cfg.framework)
    RUNTIMES.check("runtime", cfg.runtime)
    for family in FAMILIES:
        family.validate(cfg)
    rules.check(cfg)
    core.check_cuda(cfg)


def known_keys(cfg: RunConfig | None = None) -> list[str]:
    return _known_keys(cfg or RunConfig())


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_dict(cfg: RunConfig) -> dict[str, Any]:
    """Every key of ``cfg`` as ``{"section.key": value}``."""
    return flatten(to_dict(cfg))


def from_dict(tree: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    for key, value in flatten(tree).items():
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def save(cfg: RunConfig, path: str | Path) -> None:
    import tomli_w

    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))


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
