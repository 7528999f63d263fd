"""Which rows a round is evaluated on: eval.every / eval.curve_size, and data.val_size."""

from __future__ import annotations

import json

from fedtune import evalsets
from tests.conftest import run_tiny, tiny_config


def server_records(rundir):
    return [r for r in rundir.metrics.records() if r["client"] == "server"]


def test_plan_measures_every_k_rounds_on_the_subset_and_the_last_on_the_full_set():
    cfg = tiny_config(None, fed__rounds=5, eval__every=2, eval__curve_size=50)
    assert [evalsets.test_plan(cfg, r, 200) for r in range(1, 6)] == [None, "curve", None, "curve", "full"]
    assert evalsets.test_plan(cfg, 2, 50) == "full"  # a subset as large as the test set is the test set
    assert evalsets.curve_rows(200, 50) == evalsets.curve_rows(200, 50) and len(set(evalsets.curve_rows(200, 50))) == 50


def test_records_say_which_test_rows_and_carry_the_val_metric(tmp_path):
    cfg = tiny_config(tmp_path, fed__rounds=3, eval__every=2, eval__curve_size=40, data__val_size=30,
                      data__private_size=200)
    summary, rundir = run_tiny(cfg)
    recs = server_records(rundir)
    assert "test_accuracy" not in recs[0] and "val_accuracy" not in recs[0]  # round 1: not on the curve
    assert (recs[1]["test_set"], recs[1]["test_rows"]) == ("curve", 40)
    assert recs[2]["test_set"] == "full" and recs[2]["test_rows"] == 160  # the 4 labels' test rows
    assert all(0 <= r["val_accuracy"] <= 1 and "val_loss" in r for r in recs[1:])
    assert summary["final_test_accuracy"] == recs[2]["test_accuracy"]
    assert summary["final_val_accuracy"] == recs[2]["val_accuracy"]
    saved = json.loads((rundir.path / "summary.json").read_text())
    assert saved["best_val_accuracy"] == max(r["val_accuracy"] for r in recs[1:])
