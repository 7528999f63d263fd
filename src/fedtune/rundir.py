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
from .errors import FedtuneError
from .metrics import MetricsLog, summarize

CONFIG, METRICS, CHECKPOINT, SUMMARY, ADAPTER = "config.toml", "metrics.jsonl", "checkpoint.pt", "summary.json", "adapter"


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
        configlib.save(cfg, out / CONFIG)
        return cls(out)

    @classmethod
    def open(cls, path: str | Path) -> tuple["RunDir", configlib.RunConfig]:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FedtuneError(f"{path}: not a run directory (no {CONFIG})")
        return cls(path), configlib.build_config(file=path / CONFIG)

    def save_checkpoint(self, rnd: int, state: dict[str, Any]) -> None:
        # Written then renamed: a run killed while saving keeps the previous checkpoint.
        tmp = self.path / (CHECKPOINT + ".tmp")
        torch.save({"round": rnd, **state}, tmp)
        os.replace(tmp, self.path / CHECKPOINT)

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path / CHECKPOINT
        return torch.load(p, weights_only=False) if p.is_file() else None

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        summary = summarize(self.metrics.records(), extra)
        (self.path / SUMMARY).write_text(json.dumps(summary, indent=2))
        return summary
