"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024): low-rank factors B A added to the adapted
weights, with rsLoRA's alpha / sqrt(r) scaling on request (``model.lora_scaling``), FFA-LoRA's
frozen A (``model.lora_freeze_a``) and ranks that differ per client or grow over rounds
(adapters/lora_state.py says how those live in one model)."""

from __future__ import annotations

from .base import FAN_IN_FAN_OUT, Adapter, task_type


def max_rank(cfg) -> int:
    """The rank the one shared model is built with: the largest any client ever uses."""
    return max([cfg.lora_r, *cfg.client_ranks, *cfg.rank_schedule.values()])


class LoRA(Adapter):
    name = "lora"
    ranked = True
    dora = False  # DoRA: a learned magnitude per output column on top of the low-rank direction

    def peft_config(self, model_type, task="classify"):
        from peft import LoraConfig

        c = self.cfg
        return LoraConfig(
            task_type=task_type(task),
            r=max_rank(c),
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            bias="none",
            init_lora_weights=c.lora_init if c.lora_init != "default" else True,
            target_modules=self.targets(model_type),
            fan_in_fan_out=model_type in FAN_IN_FAN_OUT,
            use_rslora=c.lora_scaling == "rslora",
            use_dora=self.dora,
        )

    def freeze(self, peft_model):
        if self.cfg.lora_freeze_a:  # FFA-LoRA: A keeps its seeded init, the same on every client
            for name, p in peft_model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)


class DoRA(LoRA):
    name = "dora"
    dora = True
