"""What every PEFT method shares: the modules it adapts per architecture, the task type, and
putting the method on a frozen model. A method is a subclass of ``Adapter`` in its own file
(``peft_config`` at least) and a line in ``ADAPTERS``; the rest of fedtune asks the instance
(``prompt_tokens``, ``prefix_tokens``, ``ranked``) instead of testing the method's name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import FedtuneError

if TYPE_CHECKING:
    from torch import nn

    from ..config import ModelConfig

# The attention projections per architecture, as in the case study.
TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
# GPT-2 stores c_attn as Conv1D (weight is in x out), which the PEFT layers must be told about.
FAN_IN_FAN_OUT = {"gpt2"}


def default_targets(model_type: str) -> list[str]:
    if model_type in TARGETS:
        return TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    if model_type in peft_map:
        return list(peft_map[model_type])
    raise FedtuneError(f"no default LoRA target for architecture {model_type!r}; set model.target_modules")


def task_type(task: str):
    """The PEFT library's task type: a classification head, or the causal LM head that generates."""
    from peft import TaskType

    return TaskType.SEQ_CLS if task == "classify" else TaskType.CAUSAL_LM


class Adapter:
    """One PEFT method, built from the run's ``model`` config."""

    name: str
    ranked = False  # LoRA factors A (r x in) and B (out x r): the registry's "rank" trait

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def peft_config(self, model_type: str, task: str = "classify"):
        """The PEFT library's config of this method for a model of ``model_type``."""
        raise NotImplementedError

    def targets(self, model_type: str) -> list[str]:
        return self.cfg.target_modules or default_targets(model_type)

    @property
    def prompt_tokens(self) -> int:
        """Virtual tokens prepended to the input: every block sees L + n tokens (FLOPs, split's cut)."""
        return 0

    @property
    def prefix_tokens(self) -> int:
        """Virtual keys and values in every layer's attention: L queries x (L + n) keys."""
        return 0

    def freeze(self, peft_model: nn.Module) -> None:
        """Parameters the method keeps at their seeded init (the PEFT library trains them all)."""

    def wrap(self, model: nn.Module, task: str = "classify") -> nn.Module:
        """The method on top of the frozen ``model`` (seed torch before calling: the init is drawn)."""
        from peft import get_peft_model

        try:
            peft_model = get_peft_model(model, self.peft_config(model.config.model_type, task))
        except ValueError as exc:
            raise FedtuneError(f"model.peft={self.cfg.peft}: {exc}") from None
        self.freeze(peft_model)
        # Whoever holds the model (metering, the split cut) asks the method, not the PEFT type.
        peft_model.fedtune_adapter = self
        return peft_model


def adapter_of(model: nn.Module) -> Adapter | None:
    """The method ``Adapter.wrap`` put on ``model`` (None: a model fedtune did not wrap)."""
    return getattr(model, "fedtune_adapter", None)
