"""``lora_b`` (FedSA-LoRA; Guo et al., 2025, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning"): the A matrices learn what clients share and are averaged; the B matrices
stay with each client. The rest of the tunable state (a classification head) is shared."""

from __future__ import annotations

from ..adapters.lora_state import B_KEY
from .base import KeyedPersonalization


class FedSALoRA(KeyedPersonalization):
    name = "lora_b"

    def keeps(self, name):
        return B_KEY in name
