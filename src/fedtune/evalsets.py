"""Which rows the server model is evaluated on in a round.

- ``eval.every = K``: the test curve is measured every K rounds, on a fixed subset of
  ``eval.curve_size`` test rows (0 = the whole test set); the last round is always measured
  on the whole test set, so a run's final figure never comes from the subset.
- ``data.val_size`` rows (held out of the training pool, data.py) are measured on the same
  rounds as the test rows, as ``val_<metric>``: what ``fedtune report`` selects on.

The server record of an evaluated round says which test rows it used: ``test_set`` ("full" or
"curve") and ``test_rows`` (how many)."""

from __future__ import annotations

import random

# The curve subset is the same for every seed (as data.TEST_SUBSET_SEED), so that the curves of
# different seeds measure the same questions; a seed of its own keeps it apart from that subset.
CURVE_SEED = 4321


def test_plan(cfg, rnd: int, test_rows: int) -> str | None:
    """"full", "curve" or None (no evaluation this round)."""
    if rnd >= cfg.fed.rounds:
        return "full"
    if rnd % cfg.eval.every:
        return None
    return "curve" if 0 < cfg.eval.curve_size < test_rows else "full"


def curve_rows(test_rows: int, size: int) -> list[int]:
    """The fixed curve subset: ``size`` row numbers of the test set, sorted."""
    return sorted(random.Random(CURVE_SEED).sample(range(test_rows), size))
