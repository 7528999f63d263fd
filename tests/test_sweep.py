"""Sweeps: expanding an experiment file into points, clear errors, and a tiny sweep
(2 LoRA ranks x 2 seeds) that runs, survives a point failing mid-run, resumes that point
from its checkpoint without redoing finished work, and ends in a report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_tiny, tiny_config
from fedtune.cli import main
from fedtune.errors import FedtuneError
from fedtune.frameworks.fedavg import FedAvgFramework
from fedtune.sweep import changed_keys, load, run_sweep

TINY_EXPERIMENT = """
[sweep]
seeds = [0, 1]
out = "{out}"

[base]
train = {{ threads = 2 }}
[base.model]
name = "tiny-gpt2"
[base.data]
private_size = 60
public_size = 30
test_size = 40
max_labels = 4
[base.fed]
rounds = {rounds}

[[grid]]
set = {{ framework = "fedavg" }}
vary = {{ "model.lora_r" = [2, 4] }}
"""


def write_experiment(tmp_path, rounds=2, extra="") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(TINY_EXPERIMENT.format(out=tmp_path / "sweep", rounds=rounds) + extra)
    return path


def test_experiment_expands_into_named_points(tmp_path):
    exp = load(write_experiment(tmp_path, extra="""
[[grid]]
name = "gen"
seeds = [7]
set = { train = { task = "generate" } }
vary = { framework = ["fedavg", "kd"], "kd.logit_topk" = [0, 5] }
"""))
    names = [p.name for p in exp.points]
    assert names[:4] == ["fedavg__lora_r-2__seed0", "fedavg__lora_r-2__seed1",
                         "fedavg__lora_r-4__seed0", "fedavg__lora_r-4__seed1"]
    assert names[4:] == ["gen__framework-fedavg__logit_topk-0__seed7", "gen__framework-fedavg__logit_topk-5__seed7",
                         "gen__framework-kd__logit_topk-0__seed7", "gen__framework-kd__logit_topk-5__seed7"]
    p = exp.points[3]
    assert (p.cfg.model.lora_r, p.cfg.seed, p.cfg.model.name, p.cfg.fed.rounds) == (4, 1, "tiny-gpt2", 2)
    assert p.cfg.out == str(tmp_path / "sweep" / p.name)
    g = exp.points[-1]
    assert (g.cfg.framework, g.cfg.kd.logit_topk, g.cfg.train.task, g.seed) == ("kd", 5, "generate", 7)
    assert g.values == {"framework": "kd", "kd.logit_topk": 5}


@pytest.mark.parametrize("extra, message", [
    ('[[grid]]\nname = "x"\nvary = { "model.lora_rank" = [1] }', r"grid 2: unknown config key .*did you mean model.lora_r"),
    ('[[grid]]\nname = "x"\nvary = { "model.lora_r" = [] }', "must be a non-empty list"),
    ('[[grid]]\nname = "x"\nvary = { "model.lora_r" = [0] }', "model.lora_r must be >= 1"),
    ('[[grid]]\nname = "fedavg"', "used twice"),
    ('[[grid]]\nname = "x"\nsweep = 1', "unknown key"),
    ('[extra]\nx = 1', "unknown table"),
])
def test_bad_experiments_fail_before_running(tmp_path, extra, message):
    with pytest.raises(FedtuneError, match=message):
        load(write_experiment(tmp_path, extra="\n" + extra))
    assert not (tmp_path / "sweep").exists()


def test_sweep_resumes_an_interrupted_point_and_reports(tmp_path, monkeypatch):
    exp = load(write_experiment(tmp_path))
    victim = exp.points[3]  # lora_r=4, seed 1: its round 2 fails once
    fits: list[tuple[str, int]] = []
    fit, aggregate = FedAvgFramework.fit, FedAvgFramework.aggregate

    def counting_fit(self, rnd, cid, *args, **kwargs):
        fits.append((Path(self.cfg.out).name, rnd))
        return fit(self, rnd, cid, *args, **kwargs)

    def failing_aggregate(self, rnd, results):
        if self.cfg.out == victim.cfg.out and rnd == 2:
            raise RuntimeError("power cut")
        return aggregate(self, rnd, results)

    monkeypatch.setattr(FedAvgFramework, "fit", counting_fit)
    monkeypatch.setattr(FedAvgFramework, "aggregate", failing_aggregate)
    first = run_sweep(exp, live=True)
    assert first.done == [p.name for p in exp.points[:3]] and first.failed == [victim.name]
    vdir = Path(victim.cfg.out)
    assert "power cut" in (vdir / "error.txt").read_text()
    assert not (vdir / "summary.json").exists() and (vdir / "checkpoint.pt").exists()

    monkeypatch.setattr(FedAvgFramework, "aggregate", aggregate)
    fits.clear()
    second = run_sweep(load(write_experiment(tmp_path)), live=False)
    assert second.skipped == [p.name for p in exp.points[:3]] and second.done == [victim.name]
    # only the victim's unfinished round ran again, for its 3 clients
    assert fits == [(victim.name, 2)] * 3
    assert not (vdir / "error.txt").exists()
    records = [json.loads(line) for line in (vdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["client"]) for r in records] == [(1, 0), (1, 1), (1, 2), (1, "server"),
                                                           (2, 0), (2, 1), (2, 2), (2, "server")]
    # resuming is exact: the same accuracy as the point run in one go
    resumed = json.loads((vdir / "summary.json").read_text())
    fresh, _ = run_tiny(tiny_config(out=str(tmp_path / "fresh"), **{
        "model.lora_r": 4, "seed": 1, "data.private_size": 60, "data.public_size": 30, "data.test_size": 40}))
    assert resumed["final_test_accuracy"] == fresh["final_test_accuracy"]
    assert resumed["mb_up_per_client_per_round"] == fresh["mb_up_per_client_per_round"]

    # the one command: everything is done, so it only writes the report
    assert main(["sweep", str(write_experiment(tmp_path)), "--quiet"]) == 0
    out = tmp_path / "sweep"
    for name in ("fig3_accuracy.png", "fig4_costs.png", "accuracy_curves.png", "experiment.toml"):
        assert (out / name).is_file()
    md = (out / "report.md").read_text()
    assert "4 completed runs · model tiny-gpt2" in md
    assert "| r=2 | 2 |" in md and "| r=4 | 2 |" in md
    report = json.loads((out / "report.json").read_text())
    r4 = next(s for s in report["settings"] if s["values"] == {"model.lora_r": 4})
    accs = [json.loads((out / f"fedavg__lora_r-4__seed{s}" / "summary.json").read_text())["final_test_accuracy"]
            for s in (0, 1)]
    assert r4["stats"]["final_acc"][0] == pytest.approx(sum(accs) / 2)

    # an edited experiment refuses to mix its runs with the old ones
    edited = load(write_experiment(tmp_path, rounds=3))
    assert changed_keys(edited.points[0]) == ["fed.rounds"]
    with pytest.raises(FedtuneError, match="another config"):
        run_sweep(edited, live=False)


def test_grid_option_runs_only_the_named_grids(tmp_path, capsys):
    path = write_experiment(tmp_path, extra='\n[[grid]]\nname = "zo"\nset = { framework = "zo" }\n')
    assert main(["sweep", str(path), "--dry-run", "--grid", "zo"]) == 0
    listed = capsys.readouterr().out
    assert "zo__seed0" in listed and "zo__seed1" in listed and "fedavg" not in listed and "2 points" in listed
    assert main(["sweep", str(path), "--dry-run", "--grid", "nope"]) == 2
    assert "no grid named nope; grids: fedavg, zo" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "--grid", "zo", "--seed", "1"]) == 0
    listed = capsys.readouterr().out
    assert "zo__seed1" in listed and "seed0" not in listed and "1 points" in listed
    assert main(["sweep", str(path), "--dry-run", "--seed", "7"]) == 2
    assert "no point has seed 7; seeds: 0, 1" in capsys.readouterr().err


def test_select_seeds_runs_every_candidate_on_them_then_only_the_chosen_one(tmp_path, capsys):
    path = write_experiment(tmp_path, extra="")
    text = path.read_text().replace('out = "', 'select = "val"\nselect_seeds = [0]\nout = "')
    path.write_text(text.replace("max_labels = 4", "max_labels = 4\nval_size = 20"))
    assert main(["sweep", str(path), "--seed", "1", "--quiet", "--no-report"]) == 0
    assert "1 waiting for the choice on seeds [0]" in capsys.readouterr().err
    assert not list((tmp_path / "sweep").glob("*seed1"))  # nothing ran before the choice
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "fedavg seed 1  the point chosen on seed(s) 0, once they are done" in capsys.readouterr().out
    result = run_sweep(load(path), live=False)
    # hand computation: the final validation accuracy of each candidate on seed 0, first on a tie
    finals = {}
    for r in (2, 4):
        records = [json.loads(line) for line in (tmp_path / "sweep" / f"fedavg__lora_r-{r}__seed0" / "metrics.jsonl")
                   .read_text().splitlines()]
        finals[r] = [x["val_accuracy"] for x in records if x["client"] == "server"][-1]
    chosen = 2 if finals[2] >= finals[4] else 4
    assert result.done == ["fedavg__lora_r-2__seed0", "fedavg__lora_r-4__seed0", f"fedavg__lora_r-{chosen}__seed1"]
    assert sorted(p.name for p in (tmp_path / "sweep").glob("*seed1")) == [f"fedavg__lora_r-{chosen}__seed1"]
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "3 points" in capsys.readouterr().out
