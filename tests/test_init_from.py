"""model.init_from: a run starts from a finished run's final tunable state (inference.warm_start), for
every framework; zo's replay stays exact from that warm w0; a bad source is a one-line error;
a killed warm-started run resumes to the same metrics."""

from __future__ import annotations

import pytest
import torch

from conftest import run_tiny, tiny_config
from fedtune import models
from fedtune.errors import FedtuneError
from fedtune.frameworks import get
from fedtune.frameworks.base import Context
from fedtune.rundir import RunDir
from test_frameworks import assert_resume_matches
from test_zo import replay_client_of_round_2


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished one-round fedavg run -> (its directory, its summary, its final global state)."""
    summary, rundir = run_tiny(tiny_config(tmp_path_factory.mktemp("source"), fed__rounds=1))
    return str(rundir.path), summary, rundir.load_checkpoint()["framework"]["global_state"]


def warm(tmp_path, source, framework, **overrides):
    cfg = tiny_config(tmp_path, framework=framework, model__init_from=source[0], split__split_layer=1, **overrides)
    return get(framework)(Context.build(cfg))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("framework", ["fedavg", "kd", "split", "zo"])
def test_a_warm_run_starts_from_the_source_runs_final_state(tmp_path, source, framework):
    _, summary, final = source
    fw = warm(tmp_path, source, framework)
    # Before round 1 the global model is the source's final one: the same test metrics, to the bit.
    ev = fw.evaluate(0)
    assert (ev["test_accuracy"], ev["test_loss"]) == (summary["final_test_accuracy"], summary["final_test_loss"])
    if framework == "fedavg":
        assert same(fw.global_state, final)
    if framework == "zo":  # w0, from which server and clients replay, is the warm state
        assert same(dict(zip(models.tunable_names(fw.ctx.model), fw.init)), final)
        fresh = get("fedavg")(Context.build(tiny_config(tmp_path / "cold")))
        assert not same(fresh.global_state, final)  # ... and not the seeded initialisation


def test_zo_replay_is_exact_from_a_warm_w0(tmp_path, source):
    fw = warm(tmp_path, source, "zo", zo__steps=10)
    _, client = replay_client_of_round_2(fw)
    assert all(torch.equal(a, b) for a, b in zip(fw.params, client))
    fw.rebuild(torch.zeros(0, dtype=torch.int32), torch.zeros(0))  # no pairs: back to w0, the warm state
    assert same(models.get_tunable(fw.ctx.model), source[2])


def test_a_bad_source_is_a_one_line_error_naming_the_key(tmp_path, source):
    unfinished = tiny_config(tmp_path / "unfinished")
    RunDir.create(unfinished)  # its config.toml, no adapter yet
    cases = [
        (str(tmp_path / "nowhere"), {}, "not a run directory"),
        (unfinished.out, {}, "no trained adapter"),
        (source[0], {"data__max_labels": 3}, "that run's 4 labels differ from this run's 3"),
        (source[0], {"model__lora_r": 4}, "lora_A.weight is (8, 64) there and (4, 64) here"),
        (source[0], {"model__name": "tiny-llama"}, "that run has model.name='tiny-gpt2', this one 'tiny-llama'"),
    ]
    for path, overrides, why in cases:
        with pytest.raises(FedtuneError) as err:
            Context.build(tiny_config(tmp_path / "run", model__init_from=path, **overrides))
        msg = str(err.value)
        assert msg.startswith(f"model.init_from={path}: ") and why in msg and "\n" not in msg, msg
    with pytest.raises(FedtuneError, match="this run's own directory"):
        tiny_config(out=source[0], model__init_from=source[0])


def test_a_killed_warm_zo_run_resumes_to_the_same_metrics(tmp_path, source):
    records = assert_resume_matches(tmp_path, framework="zo", model__init_from=source[0], zo__steps=10)
    assert records[0]["zo_pairs_down"] == 0  # round 1 replays nothing: the clients start at the warm w0


def test_flower_simulation_starts_from_the_same_warm_state(tmp_path, source):
    runs = [run_tiny(tiny_config(tmp_path / runtime, framework="zo", runtime=runtime, zo__steps=10, fed__rounds=1,
                                 model__init_from=source[0]))[0] for runtime in ("inprocess", "flower-sim")]
    assert runs[0]["final_test_loss"] == runs[1]["final_test_loss"]
    assert runs[0]["final_test_loss"] != source[1]["final_test_loss"]  # zo did move the warm model
