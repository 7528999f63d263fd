"""The sweep report on hand-made run directories: exact mean/std over seeds, grouping by the
swept key, the Table I ranking and claims, and the files it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.errors import FedtuneError
from fedtune.report import aggregate, check_claims, load_runs, mean_std, ranking, write_report

# framework, task, {key: value}, seed, accuracy per round, MB up & down per client per round, client GFLOPs
RUNS = [
    ("fedavg", "classify", {"model.lora_r": 2}, 0, [0.3, 0.5], 0.010, 2.0),
    ("fedavg", "classify", {"model.lora_r": 2}, 1, [0.5, 0.7], 0.010, 2.0),
    ("fedavg", "classify", {"model.lora_r": 8}, 0, [0.6, 0.8], 0.040, 2.2),
    ("fedavg", "classify", {"model.lora_r": 8}, 1, [0.6, 0.9], 0.040, 2.4),
    ("kd", "classify", {"data.public_size": 100}, 0, [0.1, 0.2], 0.002, 9.0),
    ("kd", "classify", {"data.public_size": 100}, 1, [0.1, 0.4], 0.002, 9.0),
    ("kd", "classify", {"data.public_size": 400}, 0, [0.2, 0.5], 0.008, 20.0),
    # split: most traffic, but (unlike the paper) more client compute than fedavg
    ("split", "classify", {"split.samples_per_round": 50}, 0, [0.4, 0.6], 3.0, 2.5),
    ("split", "classify", {"split.samples_per_round": 50}, 1, [0.4, 0.6], 3.0, 2.5),
    ("fedavg", "generate", {}, 0, [0.1, 0.2], 0.050, 3.0),
    ("kd", "generate", {}, 0, [0.0, 0.1], 700.0, 30.0),
]


def make_run(root: Path, framework, task, values, seed, accs, mb, gflops) -> Path:
    """A run directory written by hand: config.toml, metrics.jsonl and summary.json."""
    name = "-".join([framework, task] + [f"{k}{v}" for k, v in values.items()] + [f"s{seed}"])
    path = root / name
    path.mkdir(parents=True)
    sections: dict[str, dict] = {"train": {"task": task}}
    for key, value in values.items():
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = value
    lines = [f'framework = "{framework}"', f"seed = {seed}", f'out = "{path}"']
    for section, items in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in items.items()]
    (path / "config.toml").write_text("\n".join(lines) + "\n")
    records = []
    for rnd, acc in enumerate(accs, 1):
        for cid in range(2):
            records.append({"round": rnd, "client": cid, "bytes_up": mb * 1e6, "bytes_down": mb * 1e6,
                            "client_flops": gflops * 1e9, "client_seconds": 1.0})
        records.append({"round": rnd, "client": "server", "test_accuracy": acc, "test_loss": 1.0, "round_seconds": 2.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"final_test_accuracy": accs[-1], "best_test_accuracy": max(accs), "mb_up_per_client_per_round": mb,
               "mb_down_per_client_per_round": mb, "gflops_per_client_per_round": gflops,
               "client_seconds_per_round": 1.0, "wall_seconds": 10.0 + seed}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    for spec in RUNS:
        make_run(root, *spec)
    # an unfinished run (no summary) and a failed one are listed but never averaged in
    unfinished = make_run(root, "fedavg", "classify", {"model.lora_r": 8}, 2, [0.0, 0.0], 9.0, 9.0)
    (unfinished / "summary.json").unlink()
    (unfinished / "error.txt").write_text("Traceback: boom\n")
    return root


def test_mean_std_is_the_sample_std():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_aggregate_groups_by_framework_task_and_swept_key(sweep_dir):
    runs = load_runs(sweep_dir)
    assert len(runs) == len(RUNS) + 1
    settings = aggregate(runs)
    by = {(s.framework, s.task, s.label): s for s in settings}
    assert list(by) == [
        ("fedavg", "classify", "r=2"), ("fedavg", "classify", "r=8"),
        ("kd", "classify", "PD=100"), ("kd", "classify", "PD=400"),
        ("split", "classify", "default"),  # one setting: nothing varies within split
        ("fedavg", "generate", "default"), ("kd", "generate", "default"),
    ]
    r2 = by["fedavg", "classify", "r=2"]
    assert [r.cfg["seed"] for r in r2.runs] == [0, 1]
    assert r2.stats["final_acc"] == pytest.approx((0.6, math.sqrt(0.02)))
    assert r2.stats["mb"] == pytest.approx((0.02, 0.0))
    assert r2.stats["wall_s"] == pytest.approx((10.5, math.sqrt(0.5)))
    # the unfinished seed-2 run of r=8 is left out: two seeds, not three
    r8 = by["fedavg", "classify", "r=8"]
    assert len(r8.runs) == 2
    assert r8.stats["final_acc"] == pytest.approx((0.85, math.sqrt(0.005)))
    assert r8.stats["gflops"] == pytest.approx((2.3, math.sqrt(0.02)))
    # the curve: mean/std over seeds per round, from metrics.jsonl
    (rnd1, *stats1), (rnd2, *stats2) = r2.curve()
    assert (rnd1, rnd2) == (1, 2)
    assert stats1 == pytest.approx([0.4, math.sqrt(0.02)]) and stats2 == pytest.approx([0.6, math.sqrt(0.02)])
    assert by["kd", "classify", "PD=400"].stats["final_acc"] == (0.5, 0.0)


def test_ranking_and_claims_come_from_the_numbers(sweep_dir):
    table = ranking(aggregate(load_runs(sweep_dir)))
    # framework figure = mean over its settings of the seed means
    assert table["accuracy"]["fedavg"] == pytest.approx((0.725, 1))
    assert table["accuracy"]["split"] == pytest.approx((0.6, 2))
    assert table["accuracy"]["kd"] == pytest.approx(((0.3 + 0.5) / 2, 3))
    assert {fw: rank for fw, (_, rank) in table["comm_classify"].items()} == {"kd": 1, "fedavg": 2, "split": 3}
    assert {fw: rank for fw, (_, rank) in table["compute"].items()} == {"fedavg": 1, "split": 2, "kd": 3}
    assert {fw: rank for fw, (_, rank) in table["comm_generate"].items()} == {"fedavg": 1, "kd": 2}
    verdicts = {text: verdict for text, verdict, _ in check_claims(table)}
    assert verdicts == {
        "FedLLM is the most accurate": "agrees",
        "Split-FedLLM has the lowest client compute": "disagrees",
        "Split-FedLLM has the highest traffic (classification)": "agrees",
        "KD-FedLLM has the cheapest traffic on classification": "agrees",
        "KD-FedLLM has the most expensive traffic on generation": "agrees",
        "KD-FedLLM has the highest client compute": "agrees",
    }


def test_report_writes_figures_tables_and_ranking(sweep_dir, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep_dir), "--out", str(out)]) == 0
    for name in ("fig3_accuracy.png", "fig4_costs.png", "accuracy_curves.png", "report.json"):
        assert (out / name).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| Model accuracy (final test accuracy) | 72.5% · **1** (1) | 40.0% · **3** (3) | 60.0% · **2** (2) |" in md
    assert "| Communication, generation (MB per client per round) | 0.1 · **1** (1) | 1,400 · **2** (3) | not measured (2) |" in md
    assert "- **disagrees**: Split-FedLLM has the lowest client compute" in md
    assert "| r=2 | 2 | 60.0 ± 14.1% | 60.0 ± 14.1% |" in md
    assert "(failed: see error.txt)" in md
    assert "11 completed runs (1 unfinished, 1 of them failed: listed at the end)" in md


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FedtuneError, match="no completed runs"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
