"""PEFT methods (``model.peft``): one file each building the PEFT library's config and saying
what it supports, one line each in the registry below."""

from __future__ import annotations

from ..registry import Registry

ADAPTERS = Registry("model.peft", {
    "lora": "fedtune.adapters.lora:LoRA",
    "dora": "fedtune.adapters.lora:DoRA",
    "ia3": "fedtune.adapters.ia3:IA3",
    "prompt": "fedtune.adapters.prompt:PromptTuning",
    "prefix": "fedtune.adapters.prefix:PrefixTuning",
}, traits={
    # rank: LoRA factors with a rank (client_ranks, rank_schedule, rank-aware strategies, FFA);
    # split_cut: fits split learning's cut (per-layer adapters on either side, a prompt on the
    # client); merge: folds into the base weights on export; any_task: runs under every task
    # (without it, train.task = classify only); virtual_tokens: learns model.virtual_tokens
    # tokens rather than per-layer weights.
    "lora": ("rank", "split_cut", "merge", "any_task"),
    "dora": ("rank", "split_cut", "merge", "any_task"),
    "ia3": ("split_cut", "merge", "any_task"),
    "prompt": ("split_cut", "virtual_tokens"),
    "prefix": ("virtual_tokens",),
})
