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
})


def make(cfg):
    """The strategy ``cfg.fed.strategy`` names, built from the run config."""
    return STRATEGIES.load(cfg.fed.strategy)(cfg)
