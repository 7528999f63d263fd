"""IA3 (Liu et al., 2022): a learned scale on the outputs of the adapted modules, no matmul of
its own."""

from __future__ import annotations

from .base import FAN_IN_FAN_OUT, Adapter, task_type


class IA3(Adapter):
    name = "ia3"

    def peft_config(self, model_type, task="classify"):
        from peft import IA3Config

        # On the attention projections, like LoRA (no feed-forward module).
        return IA3Config(task_type=task_type(task), target_modules=self.targets(model_type), feedforward_modules=[],
                         fan_in_fan_out=model_type in FAN_IN_FAN_OUT)
