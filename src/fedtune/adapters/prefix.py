"""Prefix tuning (Li & Liang, 2021): ``model.virtual_tokens`` learned keys and values in every
layer's attention (the projections still see only the L real tokens)."""

from __future__ import annotations

from .base import Adapter, task_type


class PrefixTuning(Adapter):
    name = "prefix"

    def peft_config(self, model_type, task="classify"):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=task_type(task), num_virtual_tokens=self.cfg.virtual_tokens)

    @property
    def prefix_tokens(self) -> int:
        return self.cfg.virtual_tokens
