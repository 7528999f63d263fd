"""Prompt tuning (Lester et al., 2021): ``model.virtual_tokens`` learned embeddings prepended to
the input. They sit below block 0, so every block backpropagates; under split learning they
stay on the client."""

from __future__ import annotations

from .base import Adapter, task_type


class PromptTuning(Adapter):
    name = "prompt"

    def peft_config(self, model_type, task="classify"):
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=task_type(task), num_virtual_tokens=self.cfg.virtual_tokens)

    @property
    def prompt_tokens(self) -> int:
        return self.cfg.virtual_tokens
