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
}, titles={"fedavg": "FedLLM", "kd": "KD-FedLLM", "split": "Split-FedLLM", "zo": "FedKSeed"}, traits={
    # uploads_*: what crosses the network up (weights are what fed.strategy aggregates);
    # per_batch: messages every batch, not every round; split_cut: the model is cut in two;
    # client_ranks / rank_schedule: clients may hold LoRA of different / growing ranks;
    # continual: runs continual.tasks > 1; public_rows: reads the public set (data.public_size);
    # client_eval: clients score their model on their own test rows (data.client_test_size);
    # personal_weights: a fed.personalization method may keep part of the uploaded weights.
    "fedavg": ("uploads_weights", "client_ranks", "rank_schedule", "continual", "client_eval", "personal_weights"),
    "kd": ("uploads_outputs", "public_rows", "client_ranks", "continual", "client_eval"),
    "split": ("uploads_weights", "uploads_outputs", "per_batch", "split_cut", "continual"),
    "zo": ("uploads_seeds",),
})


def get(name: str):
    return FRAMEWORKS.load(name)
