"""Server strategies: how the server turns the clients' tunable states into the next global
state. One file per strategy, one line each in the registry below (``fed.strategy``)."""

from __future__ import annotations

from ..registry import Registry

STRATEGIES = Registry("fed.strategy", {
    "fedavg": "fedtune.strategies.fedavg:FedAvg",
    "fedavgm": "fedtune.strategies.fedavgm:FedAvgM",
    "fedadam": "fedtune.strategies.fedadam:FedAdam",
    "fedyogi": "fedtune.strategies.fedyogi:FedYogi",
    "fedadagrad": "fedtune.strategies.fedadagrad:FedAdagrad",
    "scaffold": "fedtune.strategies.scaffold:Scaffold",
    "hetlora": "fedtune.strategies.hetlora:HetLoRA",
    "flexlora": "fedtune.strategies.flexlora:FlexLoRA",
    "flora": "fedtune.strategies.flora:FLoRA",
    "median": "fedtune.strategies.median:Median",
    "trimmed_mean": "fedtune.strategies.trimmed_mean:TrimmedMean",
    "krum": "fedtune.strategies.krum:Krum",
    "multikrum": "fedtune.strategies.krum:MultiKrum",
    "norm_bound": "fedtune.strategies.norm_bound:NormBound",
}, traits={
    # mean_only: needs nothing but the weighted mean of the uploads (so it runs under SecAgg+);
    # rank_aware: aggregates clients of different LoRA ranks; every_client: needs every client
    # every round (fed.fraction = 1); byzantine_f: tolerates fed.krum_f attackers (2f+3 clients);
    # shaped_like_global: keeps client-side state shaped like the global state; raw_gradients:
    # that state is built from un-noised local gradients (it would leak past DP-SGD).
    "fedavg": ("mean_only",),
    "scaffold": ("shaped_like_global", "raw_gradients"),
    "hetlora": ("rank_aware",),
    "flexlora": ("rank_aware",),
    "flora": ("rank_aware", "every_client"),
    "krum": ("byzantine_f",),
    "multikrum": ("byzantine_f",),
})


def make(cfg):
    """The strategy ``cfg.fed.strategy`` names, built from the run config."""
    return STRATEGIES.load(cfg.fed.strategy)(cfg)
