"""Continual learning (continual.py): task rows, the forgetting matrix, EWC's penalty, replay
memory, resume and the one-line errors."""

from __future__ import annotations

import pytest
import torch

from conftest import run_tiny, tiny_config
from test_frameworks import assert_resume_matches, strip
from fedtune import continual
from fedtune.errors import FedtuneError
from fedtune.frameworks import get
from fedtune.frameworks.base import ClientResult, Context
from fedtune.rundir import RunDir
from fedtune.runtimes.client_states import ClientStates
from fedtune.runtimes.rounds import MeteredLink
from fedtune.wire import Message, deserialize, serialize

TASKS = {"continual__tasks": 2, "continual__rounds_per_task": 1}


def test_label_groups_split_every_label_once_by_seed():
    groups = continual.label_groups(10, 3, seed=0)
    assert sorted(sum(groups, [])) == list(range(10))
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    assert groups == continual.label_groups(10, 3, seed=0)
    assert groups != continual.label_groups(10, 3, seed=1)


def test_a_client_trains_only_on_its_task_rows_and_its_replay_memory(tmp_path):
    cfg = tiny_config(tmp_path, continual__method="replay", continual__replay_per_task=3, **TASKS)
    fw = get("fedavg")(Context.build(cfg))
    full = fw.ctx.data.clients[1]
    seen = {}

    def fit(rnd, cid, msg, state, link, rows):  # the rows are handed in; the context is never changed
        seen[rnd] = (list(rows.labels), len(rows.ids))
        return ClientResult(Message({}), None, {})

    fw.fit = fit
    state = fw.client_fit(1, 1, Message({}), None, None).state  # task 0's last round: keeps 3 rows
    g0, g1 = fw.continual.groups
    labels, n_ids = seen[1]
    assert set(labels) <= set(g0) and len(labels) == n_ids == sum(y in g0 for y in full.labels)
    memory = state["continual"]["memory"]
    assert len(memory) == 1 and len(memory[0]) == 3 and all(full.labels[i] in g0 for i in memory[0].tolist())
    fw.client_fit(2, 1, Message({}), state, None)  # task 1: its rows and the 3 kept rows of task 0
    labels, n_ids = seen[2]
    assert sum(y in g1 for y in labels) == sum(y in g1 for y in full.labels)
    assert sum(y in g0 for y in labels) == 3 and n_ids == len(labels)
    assert fw.ctx.data.clients[1] is full  # the context holds every row


def test_forgetting_matrix_equals_a_hand_computation():
    acc = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.1], [0.4, 0.6, 0.7]]
    records = [{"round": 1, "client": "server", "task_accuracy": [0.3, 0.0, 0.0], "task_end": False}]
    records += [{"round": 2 * i + 2, "client": "server", "task_accuracy": a, "task_end": True} for i, a in enumerate(acc)]
    records += [{"round": 2, "client": 0, "train_loss": 1.0}]
    out = continual.summary(records)
    assert out["forgetting_matrix"] == acc
    # task 0: best 0.9 (after task 0), last 0.4; task 1: best 0.8, last 0.6
    assert out["forgetting"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2, abs=1e-12)
    assert out["average_task_accuracy"] == pytest.approx((0.4 + 0.6 + 0.7) / 3, abs=1e-12)
    assert continual.summary([{"round": 1, "client": "server", "test_accuracy": 0.5}]) == {}


def test_ewc_penalty_and_its_gradient_equal_a_hand_computation():
    w = {"a": torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64)),
         "b": torch.nn.Parameter(torch.tensor([[0.5]], dtype=torch.float64))}
    past = [{"fisher": {"a": torch.tensor([2.0, 0.5]), "b": torch.tensor([[4.0]])},
             "anchor": {"a": torch.tensor([0.0, -1.0]), "b": torch.tensor([[0.0]])}},
            {"fisher": {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.25]])},
             "anchor": {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[1.5]])}}]
    rule = continual.EWC(w, past, lam=3.0)
    # task 0: 2*1^2 + 0.5*1^2 + 4*0.5^2 = 3.5; task 1: 1*2^2 + 0 + 0.25*1^2 = 4.25
    assert rule.penalty().item() == pytest.approx(3.0 / 2 * (3.5 + 4.25), abs=1e-12)
    for p in w.values():
        p.grad = torch.ones_like(p)
    rule.on_grad()
    # lambda * sum_u F_u (w - w*_u), added to the gradient there
    assert w["a"].grad.tolist() == pytest.approx([1 + 3 * (2 * 1 + 1 * -2), 1 + 3 * (0.5 * -1 + 0)], abs=1e-12)
    assert w["b"].grad.item() == pytest.approx(1 + 3 * (4 * 0.5 + 0.25 * -1), abs=1e-12)
    auto = torch.autograd.grad(rule.penalty(), list(w.values()))  # the term is the penalty's gradient
    assert all(torch.allclose(p.grad - 1, g, atol=1e-12) for p, g in zip(w.values(), auto))


def test_ewc_with_lambda_zero_trains_as_none(tmp_path):
    _, none = run_tiny(tiny_config(tmp_path / "none", fed__rounds=3, **TASKS))
    _, ewc = run_tiny(tiny_config(tmp_path / "ewc", fed__rounds=3, continual__method="ewc", continual__ewc_lambda=0.0,
                                  **TASKS))
    keep = ("round", "client", "test_accuracy", "test_loss", "task_accuracy", "train_loss")
    view = lambda rd: [{k: r.get(k) for k in keep} for r in rd.metrics.records()]  # noqa: E731
    assert view(none) == view(ewc)
    assert any(r.get("client_flops_fisher", 0) > 0 for r in ewc.metrics.records())  # the Fisher was computed


def test_ewc_keeps_old_task_accuracy_where_none_forgets(tmp_path):
    """A strong penalty holds the parameters at task 0's end: task 0 is forgotten less."""
    cfg = dict(fed__rounds=4, continual__rounds_per_task=2, continual__tasks=2)
    none, _ = run_tiny(tiny_config(tmp_path / "none", **cfg))
    ewc, _ = run_tiny(tiny_config(tmp_path / "ewc", continual__method="ewc", continual__ewc_lambda=1e4, **cfg))
    assert ewc["forgetting"] < none["forgetting"]


@pytest.mark.parametrize("framework,method", [("fedavg", "ewc"), ("kd", "replay"), ("split", "ewc")])
def test_continual_state_checkpoints_and_resumes_to_the_same_metrics(tmp_path, framework, method):
    records = assert_resume_matches(tmp_path, kill_round=3, framework=framework, fed__rounds=3, continual__tasks=3,
                                    continual__method=method, continual__replay_per_task=5, continual__rounds_per_task=1,
                                    kd__client_eval_size=0, data__test_size=100, split__split_layer=1)
    server = [r for r in records if r["client"] == "server"]
    assert [r["task"] for r in server] == [0, 1, 2] and all(len(r["task_accuracy"]) == 3 for r in server)
    last = [r for r in records if r["client"] != "server" and r["round"] == 3]
    if method == "replay":  # 5 kept rows of each of the two past tasks
        assert all(r["replay_rows"] == 10 for r in last)
    ckpt = RunDir(tmp_path / "b" / "run").load_checkpoint()
    for state in ClientStates.of_run(tmp_path / "b" / "run", ckpt).values():
        kept = state["continual"]["memory" if method == "replay" else "ewc"]
        assert len(kept) == 2
    summary = RunDir(tmp_path / "b" / "run").path / "summary.json"
    assert "forgetting_matrix" in summary.read_text()


def test_split_fisher_exchange_does_not_step_the_server(tmp_path):
    cfg = tiny_config(tmp_path, framework="split", split__split_layer=1)
    fw = get("split")(Context.build(cfg))
    from fedtune.models import get_tunable

    before = {k: v.clone() for k, v in get_tunable(fw.split.server).items()}
    link = MeteredLink(lambda blob: serialize(fw.serve(1, 0, deserialize(blob))))
    ids, labels = fw.ctx.ids["client0"][:2], fw.ctx.data.clients[0].labels[:2]
    fisher, anchor, flops = continual.Continual.fisher(fw, ids, labels, link)
    after = get_tunable(fw.split.server)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flops > 0 and link.bytes_up > 0 and any(f.abs().sum() > 0 for f in fisher.values())
    assert fisher.keys() == anchor.keys() == {n for n, p in fw.split.client.named_parameters() if p.requires_grad}


def test_flower_simulation_equals_inprocess_with_tasks(tmp_path):
    kw = dict(framework="split", split__split_layer=1, continual__method="ewc", fed__rounds=2, **TASKS)
    _, ref = run_tiny(tiny_config(tmp_path / "a", **kw))
    _, sim = run_tiny(tiny_config(tmp_path / "b", runtime="flower-sim", **kw))
    drop = {"runtime"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in strip(ref.metrics.records())] == \
        [{k: v for k, v in r.items() if k not in drop} for r in strip(sim.metrics.records())]


@pytest.mark.parametrize("overrides,needle", [
    ({"continual.tasks": 0}, "continual.tasks"),
    ({"continual.tasks": 2, "continual.rounds_per_task": 0}, "continual.rounds_per_task"),
    ({"continual.tasks": 2, "continual.method": "lwf"}, "continual.method must be one of none, ewc, replay"),
    ({"continual.tasks": 2, "continual.method": "ewc", "continual.ewc_lambda": -1.0}, "continual.ewc_lambda"),
    ({"continual.tasks": 2, "continual.method": "replay", "continual.replay_per_task": 0}, "continual.replay_per_task"),
    ({"continual.method": "ewc"}, "needs continual.tasks > 1"),
    ({"continual.tasks": 2, "framework": "zo"}, "fedavg, kd or split"),
    ({"continual.tasks": 5}, "data.max_labels=4"),
    ({"continual.tasks": 2, "continual.rounds_per_task": 2}, "fed.rounds=2 leaves tasks unseen"),
    ({"continual.tasks": 2, "continual.method": "ewc", "fed.fraction": 0.5}, "fed.fraction=1"),
    ({"continual.tasks": 2, "continual.method": "ewc", "framework": "split", "privacy.output_noise_multiplier": 1.0},
     "privacy.output_noise_multiplier"),
])
def test_bad_continual_values_give_one_line_errors(overrides, needle):
    with pytest.raises(FedtuneError) as err:
        tiny_config(None, **{k.replace(".", "__"): v for k, v in overrides.items()})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_task_without_test_rows_is_a_one_line_error(tmp_path):
    cfg = tiny_config(tmp_path, continual__tasks=4, fed__rounds=4, data__test_size=2)
    with pytest.raises(FedtuneError, match="has no test rows to measure forgetting on"):
        get("fedavg")(Context.build(cfg))
