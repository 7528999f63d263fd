"""The frameworks: one file each implementing ``base.Framework``, one line each in the registry
below (``--framework``). Imported on first use, so one framework's dependencies never slow down
another's start."""

from __future__ import annotations

from ..registry import Registry

FRAMEWORKS = Registry("framework", {
    "fedavg": "fedtune.frameworks.fedavg:FedAvgFramework",
    "kd": "fedtune.frameworks.kd:KDFramework",
    "split": "fedtune.frameworks.split:SplitFramework",
    "zo": "fedtune.frameworks.zo:ZOFramework",
}, titles={"fedavg": "FedLLM", "kd": "KD-FedLLM", "split": "Split-FedLLM", "zo": "FedKSeed"})


def get(name: str):
    return FRAMEWORKS.load(name)
