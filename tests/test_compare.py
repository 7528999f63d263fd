"""The report's statistics on hand-made sweep directories: the t interval and paired differences
against hand computations, and selection on validation that never reads a test record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.errors import FedtuneError
from fedtune.report import write_report
from fedtune.report.stats import paired, t_interval, verdict

T_975_2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (tables: 4.303)

EXPERIMENT = """
[sweep]
seeds = [0, 1, 2]
select = "val"
select_round = "{round}"
baseline = "fedavg"
[base.data]
val_size = 50
[[grid]]
name = "fedavg"
[[grid]]
name = "fedadam"
set = {{ fed = {{ strategy = "fedadam" }} }}
vary = {{ "fed.server_lr" = [0.01, 0.1] }}
"""


def point(root: Path, name: str, seed: int, vals: list[float], tests: list[float], lr: float | None = None) -> Path:
    """A run directory named as a sweep names its points, with per-round val and test figures."""
    path = root / f"{name}__seed{seed}"
    path.mkdir(parents=True)
    fed = f"[fed]\nstrategy = \"fedadam\"\nserver_lr = {lr}\n" if lr else ""
    (path / "config.toml").write_text(f'framework = "fedavg"\nseed = {seed}\nout = "{path}"\n[data]\nval_size = 50\n{fed}')
    recs = [{"round": r, "client": "server", "test_accuracy": t, "val_accuracy": v, "round_seconds": 1.0}
            for r, (v, t) in enumerate(zip(vals, tests), 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (path / "summary.json").write_text(json.dumps({"final_test_accuracy": tests[-1], "best_test_accuracy": max(tests),
                                                   "final_val_accuracy": vals[-1]}))
    return path


def sweep(tmp_path: Path, swap_tests: bool = False, select_round: str = "final") -> Path:
    root = tmp_path / f"sweep-{swap_tests}-{select_round}"
    root.mkdir()
    (root / "experiment.toml").write_text(EXPERIMENT.format(round=select_round))
    # fedadam at 0.01: mean final val (0.60 + 0.62 + 0.64) / 3 = 0.62; at 0.1: (0.70 + 0.50 + 0.55) / 3 = 0.5833.
    # Best round: 0.01 -> (0.60 + 0.62 + 0.64) / 3 = 0.62; 0.1 -> (0.70 + 0.66 + 0.65) / 3 = 0.67.
    lo_tests, hi_tests = [[0.50, 0.55], [0.52, 0.56], [0.54, 0.57]], [[0.80, 0.90], [0.81, 0.91], [0.82, 0.92]]
    if swap_tests:  # the test records change; the choice must not
        lo_tests, hi_tests = hi_tests, lo_tests
    for seed in range(3):
        point(root, "fedavg", seed, [0.4, 0.5], [0.45, [0.50, 0.55, 0.60][seed]])
        point(root, "fedadam__server_lr-0.01", seed, [0.55, [0.60, 0.62, 0.64][seed]], lo_tests[seed], 0.01)
        point(root, "fedadam__server_lr-0.1", seed, [[0.70, 0.66, 0.65][seed], [0.70, 0.50, 0.55][seed]],
              hi_tests[seed], 0.1)
    return root


def test_t_interval_is_the_hand_computed_one():
    iv = t_interval([0.5, 0.6, 0.7])
    half = T_975_2 * 0.1 / math.sqrt(3)  # s = 0.1 (n - 1)
    assert (iv.n, iv.mean, iv.low, iv.high) == pytest.approx((3, 0.6, 0.6 - half, 0.6 + half))
    one = t_interval([0.4])
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.low)


def test_paired_difference_over_common_seeds_and_its_verdict():
    base = {0: 0.50, 1: 0.55, 2: 0.70, 7: 0.99}  # seed 7 has no partner: left out
    diff = paired({0: 0.60, 1: 0.70, 2: 0.90}, base)  # differences 0.10, 0.15, 0.20: mean 0.15, s 0.05
    half = T_975_2 * 0.05 / math.sqrt(3)
    assert (diff.n, diff.mean, diff.low, diff.high) == pytest.approx((3, 0.15, 0.15 - half, 0.15 + half))
    assert verdict(diff) == "wins"
    assert verdict(paired({0: 0.40, 1: 0.43, 2: 0.55}, base)) == "loses"  # -0.10, -0.12, -0.15
    assert verdict(paired({0: 0.6, 1: 0.45, 2: 0.75}, base)) == "no significant difference"  # +0.10, -0.10, +0.05
    assert verdict(paired({0: 0.6}, base)).startswith("too few")


def comparison(root: Path) -> dict:
    write_report(root)
    return json.loads((root / "report.json").read_text())["comparison"]


def test_selection_on_validation_picks_the_hand_computed_point_whatever_the_test_records(tmp_path):
    got = comparison(sweep(tmp_path))
    fedadam = next(e for e in got["entries"] if e["name"] == "fedadam")
    assert fedadam["chosen"].startswith("server_lr-0.01 (mean val 62.0%")
    assert fedadam["runs"]["0"].endswith("fedadam__server_lr-0.01__seed0")
    assert fedadam["test"] == {"0": 0.55, "1": 0.56, "2": 0.57}  # only the chosen point's test figures
    swapped_root = sweep(tmp_path, swap_tests=True)
    swapped = next(e for e in comparison(swapped_root)["entries"] if e["name"] == "fedadam")
    assert swapped["chosen"] == fedadam["chosen"]
    assert [Path(p).name for p in swapped["runs"].values()] == [Path(p).name for p in fedadam["runs"].values()]
    # paired against fedavg (0.50, 0.55, 0.60): +0.05, +0.01, -0.03 -> no significant difference
    assert fedadam["paired_difference"]["mean"] == pytest.approx(0.01)
    assert fedadam["conclusion"] == "no significant difference"
    md = (tmp_path / "sweep-False-final" / "report.md").read_text()
    assert "| fedadam | 3 | 56.0 |" in md and "server_lr-0.01 (mean val 62.0%; not chosen: server_lr-0.1 58.3%)" in md
    assert "- **fedadam** shows no significant difference from `fedavg`: +1.0 points" in md
    assert "| Model accuracy (final test accuracy) | 55.5% · **1** (1)" in md  # (55.0 + 56.0) / 2: chosen points only
    # the curve table: fedadam 0.01's rounds 1 (0.50, 0.52, 0.54) and 2 (0.55, 0.56, 0.57); half-width t * s / sqrt(3)
    assert "| fedadam | 52.0 ± 5.0 | 56.0 ± 2.5 |" in md and "| fedavg | 45.0 ± 0.0 | 55.0 ± 12.4 |" in md


def test_best_round_selection_reports_the_test_figure_of_each_runs_best_val_round(tmp_path):
    got = comparison(sweep(tmp_path, select_round="best"))
    fedadam = next(e for e in got["entries"] if e["name"] == "fedadam")
    assert fedadam["chosen"].startswith("server_lr-0.1 (mean val 67.0%")
    # best val round per seed: seed 0 ties (0.70, 0.70) -> round 1; seeds 1 and 2 -> round 1
    assert fedadam["test"] == {"0": 0.80, "1": 0.81, "2": 0.82}
    # fedavg's best val round is round 2 (test 0.50, 0.55, 0.60): +0.30, +0.26, +0.22, mean 0.26, s 0.04
    assert fedadam["paired_difference"]["low"] == pytest.approx(0.26 - T_975_2 * 0.04 / math.sqrt(3))
    assert fedadam["conclusion"] == "wins"


def test_a_select_sweep_without_val_rows_or_with_an_unknown_baseline_fails_early(tmp_path):
    from fedtune import sweep as sweeplib

    path = tmp_path / "e.toml"
    path.write_text(EXPERIMENT.format(round="final").replace("val_size = 50", "val_size = 0"))
    with pytest.raises(FedtuneError, match="data.val_size > 0"):
        sweeplib.load(path)
    path.write_text(EXPERIMENT.format(round="final").replace('baseline = "fedavg"', 'baseline = "fedprox"'))
    with pytest.raises(FedtuneError, match="baseline 'fedprox' is not a grid"):
        sweeplib.load(path)
    path.write_text(EXPERIMENT.format(round="sometimes"))
    with pytest.raises(FedtuneError, match="select_round must be one of"):
        sweeplib.load(path)


def test_report_baseline_option_names_an_entry(tmp_path):
    root = sweep(tmp_path)
    assert main(["report", str(root), "--baseline", "fedadam"]) == 0
    assert "## Paired differences against `fedadam`" in (root / "report.md").read_text()
    with pytest.raises(FedtuneError, match="baseline 'nope' is none of"):
        write_report(root, baseline="nope")


def test_select_seeds_chooses_on_those_seeds_alone_and_reports_every_seed_of_the_choice(tmp_path):
    root = sweep(tmp_path)
    text = (root / "experiment.toml").read_text().replace('select = "val"', 'select = "val"\nselect_seeds = [0]')
    (root / "experiment.toml").write_text(text)
    for seed in (1, 2):  # the sweep ran the other candidate on seed 0 only
        for f in (root / f"fedadam__server_lr-0.01__seed{seed}").iterdir():
            f.unlink()
        (root / f"fedadam__server_lr-0.01__seed{seed}").rmdir()
    got = comparison(root)
    fedadam = next(e for e in got["entries"] if e["name"] == "fedadam")
    # seed 0's final val: 0.01 -> 0.60, 0.1 -> 0.70 (over all three seeds 0.01 would win, 62.0% to 58.3%)
    assert fedadam["chosen"] == "server_lr-0.1 (mean val 70.0%; not chosen: server_lr-0.01 60.0%)"
    assert fedadam["test"] == {"0": 0.90, "1": 0.91, "2": 0.92}
    assert got["select_seeds"] == [0]
    assert "on seed(s) 0; the other seeds ran the chosen point only" in (root / "report.md").read_text()
    (root / "experiment.toml").write_text(text.replace("select_seeds = [0]", "select_seeds = [5]"))
    from fedtune import sweep as sweeplib
    with pytest.raises(FedtuneError, match="select_seeds 5 are not seeds of the sweep"):
        sweeplib.load(root / "experiment.toml")
