"""One battery over every registered framework: what the project promises of all of them.

- bytes counted in metrics.jsonl equal the bytes of the messages actually serialized (the round's
  message each way plus every per-batch message), counted here independently of the meter;
- ``state_dict`` round-trips through a checkpoint file to the same global model;
- a run killed mid-round and resumed ends with the same metrics as an uninterrupted run;
- the Flower simulation runtime gives the same accuracy (to 1e-6) and the same bytes as in-process."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import run_tiny, tiny_config
from fedtune.console import Progress
from fedtune.frameworks import FRAMEWORKS, get
from fedtune.frameworks.base import Context
from fedtune.rundir import RunDir
from fedtune.runtimes import run
from fedtune.runtimes.inprocess import InProcessGrid
from fedtune.runtimes.rounds import run_rounds

TIMING = {"client_seconds", "client_peak_mem_bytes", "server_seconds", "round_seconds", "server_train_seconds",
          "message_seconds", "client_replay_seconds"}
ALL = list(FRAMEWORKS.names)


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def config(path, framework, **kw):
    return tiny_config(path, framework=framework, kd__client_eval_size=50, data__test_size=100,
                       split__split_layer=1, zo__steps=10, **kw)


class CountingGrid(InProcessGrid):
    """The in-process grid, counting every blob that crosses between server and client."""

    def __init__(self, fw, progress):
        super().__init__(fw, progress)
        self.sent: dict[tuple[int, int], list[int]] = {}  # (round, client) -> [bytes down, bytes up]

    def start(self, serve):
        if serve is None:
            return super().start(None)

        def counted(rnd, cid, blob):
            reply = serve(rnd, cid, blob)
            self.sent[rnd, cid][0] += len(reply)
            self.sent[rnd, cid][1] += len(blob)
            return reply

        super().start(counted)

    def fit(self, rnd, blobs, restore, on_reply):
        def count(cid, reply):
            self.sent[rnd, cid][1] += len(reply.blob)
            on_reply(cid, reply)

        for cid, blob in blobs.items():
            self.sent[rnd, cid] = [len(blob), 0]
        return super().fit(rnd, blobs, restore, count)


@pytest.mark.parametrize("framework", ALL)
def test_bytes_counted_equal_the_serialized_messages(tmp_path, framework):
    cfg = config(tmp_path, framework)
    rundir = RunDir.create(cfg)
    ctx = Context.build(cfg)
    fw = get(framework)(ctx)
    grid = CountingGrid(fw, Progress())
    run_rounds(fw, grid, rundir)
    clients = [r for r in rundir.metrics.records() if r["client"] != "server"]
    assert len(clients) == cfg.fed.rounds * cfg.fed.clients
    for r in clients:
        down, up = grid.sent[r["round"], r["client"]]
        assert (r["bytes_down"], r["bytes_up"]) == (down, up)
        assert up > 0 and (down > 0 or framework == "kd")  # kd's first round sends no knowledge yet


@pytest.mark.parametrize("framework", ALL)
def test_state_dict_round_trips_through_a_checkpoint(tmp_path, framework):
    cfg = config(tmp_path, framework, fed__rounds=1)
    rundir = RunDir.create(cfg)
    ctx = Context.build(cfg)
    fw = get(framework)(ctx)
    run_rounds(fw, InProcessGrid(fw, Progress()), rundir)
    trained = fw.evaluate(1)
    buf = io.BytesIO()
    torch.save(fw.state_dict(), buf)
    fresh = get(framework)(Context.build(cfg))  # a new model at the initial state
    assert fresh.evaluate(1) != trained
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert fresh.evaluate(1) == trained


class KillAt(Progress):
    """Stops the run as a kill would: in round ``rnd`` after ``after`` clients finished."""

    def __init__(self, rnd, after):
        self.rnd, self.after = rnd, after

    def client(self, rnd, cid, position, count):
        if rnd == self.rnd and position == self.after + 1:
            raise KeyboardInterrupt


def assert_resume_matches(tmp_path, kill_round: int = 2, **overrides) -> list[dict]:
    """A run killed in round ``kill_round`` after one client, then resumed, ends with the same
    metrics (timing aside) as the same run uninterrupted -> the resumed run's records."""
    whole = tiny_config(tmp_path / "a", **overrides)
    run_tiny(whole)
    cut = tiny_config(tmp_path / "b", **overrides)
    rundir = RunDir.create(cut)
    with pytest.raises(KeyboardInterrupt):
        run(cut, rundir, KillAt(rnd=kill_round, after=1))
    assert max(r["round"] for r in rundir.metrics.records()) == kill_round  # one client record written
    reopened, cfg = RunDir.open(rundir.path)
    run(cfg, reopened, resume=True)
    assert strip(RunDir(whole.out).metrics.records()) == strip(reopened.metrics.records())
    return reopened.metrics.records()


@pytest.mark.parametrize("framework", ALL)
def test_killed_and_resumed_run_ends_with_the_same_metrics(tmp_path, framework):
    assert_resume_matches(tmp_path, framework=framework, kd__client_eval_size=50, data__test_size=100,
                          split__split_layer=1, zo__steps=10, fed__rounds=3)


@pytest.mark.parametrize("framework", ALL)
def test_flower_simulation_equals_inprocess(tmp_path, framework):
    ref, ref_dir = run_tiny(config(tmp_path / "a", framework))
    sim, sim_dir = run_tiny(config(tmp_path / "b", framework, runtime="flower-sim"))
    assert sim["rounds"] == ref["rounds"] == 2
    assert abs(sim["final_test_accuracy"] - ref["final_test_accuracy"]) <= 1e-6
    assert abs(sim["final_test_loss"] - ref["final_test_loss"]) <= 1e-6
    drop = TIMING | {"runtime"}
    a = [{k: v for k, v in r.items() if k not in drop} for r in ref_dir.metrics.records()]
    b = [{k: v for k, v in r.items() if k not in drop} for r in sim_dir.metrics.records()]
    assert a == b  # every record, bytes included, in the same order
