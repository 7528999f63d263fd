"""``classify``: a sequence-classification head; one output row per example (width = labels)."""

from __future__ import annotations

import torch

from ..data import Rows, encode
from .base import Task


class ClassifyTask(Task):
    name = "classify"

    def __init__(self, tokenizer, label_names: list[str], max_length: int):
        self.tok, self.max_length = tokenizer, max_length

    def encode(self, rows: Rows) -> list[list[int]]:
        return encode(self.tok, rows.texts, self.max_length)

    def outputs(self, model, batch):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def targets(self, batch):
        return batch.labels

    def row_sample(self, batch):
        return torch.arange(len(batch.labels), device=batch.labels.device)

    def rows_per_example(self, labels):
        return [1] * len(labels)
