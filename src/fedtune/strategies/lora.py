"""The LoRA-state algebra (adapters/lora_state.py) and the rank-aware strategies' base
(strategies/rank.py) under one name, the one frameworks/kd.py imports."""

from __future__ import annotations

from ..adapters.lora_state import (  # noqa: F401
    A_KEY, B_KEY, MERGE, MERGE_TAG, aggregation_error, apply_merges, fit_to, merge_once, pairs, products, rank,
    resize, scaled_products, stack, svd_factors, weighted,
)
from .rank import MergingStrategy, RankStrategy  # noqa: F401
