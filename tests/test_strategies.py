"""Server strategies (fedavgm, fedadam, fedyogi, fedadagrad, scaffold) and FedProx's client term:
hand computations in float64, SCAFFOLD's reduction to FedAvg, exact bytes with the control
variates, resume equality, flower-sim parity and one-line config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import run_tiny, tiny_config
from fedtune import models
from fedtune.data import Batch
from fedtune.errors import FedtuneError
from fedtune.metering import FlopModel
from fedtune.runtimes.client_states import ClientStates
from fedtune.strategies import make
from fedtune.strategies.base import split_extras, with_extras
from fedtune.strategies.prox import Proximal
from fedtune.strategies.scaffold import STATE_KEY, ScaffoldRule
from fedtune.training import train_pass
from fedtune.wire import Message, payload_bytes, serialize
from test_frameworks import assert_resume_matches

F64 = torch.float64
# Two rounds, two clients with sample weights 1 and 3, three coordinates.
X0 = [0.5, -1.0, 2.0]
CLIENTS = [
    ([[1.0, -1.5, 2.0], [0.0, 1.0, 2.5]], 1.0),  # (client state in round 1, in round 2), weight
    ([[0.0, -0.5, 2.2], [0.4, 0.0, 1.5]], 3.0),
]


def strategy(name, **fed):
    return make(tiny_config(fed__strategy=name, **{f"fed__{k}": v for k, v in fed.items()}))


def run_two_rounds(s):
    x = {"w": torch.tensor(X0, dtype=F64)}
    out = []
    for rnd in range(2):
        updates = [({"w": torch.tensor(states[rnd], dtype=F64)}, w) for states, w in CLIENTS]
        x = s.aggregate(x, updates)
        out += x["w"].tolist()
    return out  # round 1's coordinates, then round 2's


def deltas_by_hand():
    """Per round and coordinate: Delta = weighted mean of the clients - x, x following the rule."""
    total = sum(w for _, w in CLIENTS)
    return lambda rnd, j, x: sum(s[rnd][j] * w for s, w in CLIENTS) / total - x


def hand(rule):
    """Run ``rule(state, delta) -> (state, step)`` by hand, coordinate by coordinate, in Python floats."""
    delta = deltas_by_hand()
    out, xs, states = [], list(X0), [None] * 3
    for rnd in range(2):
        for j in range(3):
            states[j], step = rule(states[j], delta(rnd, j, xs[j]))
            xs[j] += step
        out += xs
    return out


def test_fedavgm_equals_a_hand_computation():
    lr, beta = 0.7, 0.9

    def rule(m, d):
        m = d if m is None else beta * m + d
        return m, lr * m

    assert run_two_rounds(strategy("fedavgm", server_lr=lr, server_momentum=beta)) == pytest.approx(hand(rule), abs=1e-12)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_equals_a_hand_computation(name):
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 0.01

    def v_next(v, d2):
        if name == "fedadam":
            return b2 * v + (1 - b2) * d2
        if name == "fedyogi":
            return v - (1 - b2) * d2 * math.copysign(1.0, v - d2) * (v != d2)
        return v + d2

    def rule(mv, d):
        m, v = mv or (0.0, tau**2)
        m, v = b1 * m + (1 - b1) * d, v_next(v, d * d)
        return (m, v), lr * m / (math.sqrt(v) + tau)

    got = run_two_rounds(strategy(name, server_lr=lr, beta1=b1, beta2=b2, tau=tau))
    assert got == pytest.approx(hand(rule), abs=1e-12)
    assert got[:3] != pytest.approx(got[3:])  # it moved


def test_scaffold_server_steps_x_and_keeps_c_the_mean_of_all_client_variates():
    s = strategy("scaffold", server_lr=0.5)  # 3 clients (the tiny config)
    x = {"w": torch.tensor(X0, dtype=F64)}
    assert torch.equal(s.downlink(x, 0)["w"], torch.zeros(3, dtype=F64))  # c starts at zero
    s.receive([{"w": torch.tensor([3.0, 0.0, -3.0], dtype=F64)}, {"w": torch.tensor([0.0, 6.0, 0.0], dtype=F64)}])
    assert s.downlink(x, 1)["w"].tolist() == pytest.approx([1.0, 2.0, -1.0])  # sum / N, N = 3
    got = s.aggregate(x, [({"w": torch.tensor(st[0], dtype=F64)}, w) for st, w in CLIENTS])
    mean = [(a * 1 + b * 3) / 4 for a, b in zip(CLIENTS[0][0][0], CLIENTS[1][0][0])]
    assert got["w"].tolist() == pytest.approx([x0 + 0.5 * (m - x0) for x0, m in zip(X0, mean)], abs=1e-12)


class Quadratic(nn.Module):
    """loss = 0.5 * ||w - target||^2 + 0 * batch: its gradient is w - target, by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=F64))


def quadratic_pass(model, target, steps, rule=None, optimizer=None):
    batch = Batch(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1), torch.zeros(1))
    loss = lambda m, b: 0.5 * ((m.w - target) ** 2).sum()  # noqa: E731
    cfg = tiny_config().train
    return train_pass(model, [batch] * steps, cfg, torch.device("cpu"), FlopModel((), 0, 0, 0), loss,
                      optimizer=optimizer, flop_fn=lambda b: 0, on_grad=rule.on_grad if rule else None)


def test_prox_term_is_one_analytic_gradient_step():
    model, target, lr, mu = Quadratic(), torch.tensor([0.0, 1.0, 1.0], dtype=F64), 0.1, 0.5
    anchor = {"w": torch.tensor([2.0, 0.0, -1.0], dtype=F64)}
    w0 = model.w.detach().clone()
    rule = Proximal(dict(model.named_parameters()), anchor, mu)
    quadratic_pass(model, target, 1, rule, torch.optim.SGD(model.parameters(), lr=lr))
    # d/dw [0.5 ||w - t||^2 + mu/2 ||w - w_global||^2] = (w - t) + mu (w - w_global)
    expected = w0 - lr * ((w0 - target) + mu * (w0 - anchor["w"]))
    assert torch.allclose(model.w.detach(), expected, atol=1e-15, rtol=0)


def test_prox_mu_zero_equals_plain_training_exactly():
    """The rule's path with mu = 0 (through Adam, several steps) changes nothing, bit for bit."""
    target = torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    plain, prox = Quadratic(), Quadratic()
    quadratic_pass(plain, target, 5)
    quadratic_pass(prox, target, 5, Proximal(dict(prox.named_parameters()), {"w": torch.zeros(3, dtype=F64)}, 0.0))
    assert torch.equal(plain.w, prox.w)


def test_scaffold_client_corrects_every_step_and_its_new_variate_is_the_mean_gradient():
    model, target, lr = Quadratic(), torch.tensor([0.0, 1.0, 1.0], dtype=F64), 0.1
    c, c_i = {"w": torch.tensor([0.3, -0.2, 0.1], dtype=F64)}, {"w": torch.tensor([0.1, 0.1, -0.4], dtype=F64)}
    rule = ScaffoldRule(dict(model.named_parameters()), c, c_i)
    quadratic_pass(model, target, 2, rule, torch.optim.SGD(model.parameters(), lr=lr))
    y, grads = model.w.detach().new_tensor([1.0, -2.0, 0.5]), []
    for _ in range(2):  # y <- y - lr (g(y) - c_i + c)
        grads.append(y - target)
        y = y - lr * (grads[-1] - c_i["w"] + c["w"])
    assert torch.allclose(model.w.detach(), y, atol=1e-15, rtol=0)
    new = (grads[0] + grads[1]) / 2
    # For SGD the mean gradient is the paper's option II: c_i - c + (x - y) / (K lr).
    option2 = c_i["w"] - c["w"] + (torch.tensor([1.0, -2.0, 0.5], dtype=F64) - y) / (2 * lr)
    assert torch.allclose(new, option2, atol=1e-12)
    assert torch.allclose(rule.state()[STATE_KEY]["w"], new, atol=1e-15)
    assert torch.allclose(rule.upload()["w"], new - c_i["w"], atol=1e-15)


def global_state(rundir):
    return rundir.load_checkpoint()["framework"]["global_state"]


def test_scaffold_with_zero_variates_and_one_local_step_equals_fedavg(tmp_path):
    # 100 rows per client and batches of 128: one local step; round 1's variates are zero.
    kw = dict(fed__rounds=1, train__batch_size=128, data__test_size=50)
    avg, avg_dir = run_tiny(tiny_config(tmp_path / "a", **kw))
    sca, sca_dir = run_tiny(tiny_config(tmp_path / "b", fed__strategy="scaffold", **kw))
    a, b = global_state(avg_dir), global_state(sca_dir)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert sca["final_test_accuracy"] == pytest.approx(avg["final_test_accuracy"], abs=1e-6)
    # The control variates travel both ways and are counted: c down, Delta c_i up, one tensor each.
    state = models.get_tunable(models.build(tiny_config().model, 4, 0)[0])
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    expected = len(serialize(Message(with_extras(state, zeros))))
    clients = [r for r in sca_dir.metrics.records() if r["client"] != "server"]
    assert all(r["bytes_up"] == expected and r["bytes_down"] == expected for r in clients)
    assert payload_bytes(with_extras(state, zeros)) == 2 * payload_bytes(state)
    # Each client kept its own variate (the mean gradient of its one step): client state.
    states = ClientStates.of_run(sca_dir.path, sca_dir.load_checkpoint())
    assert sorted(states) == [0, 1, 2] and all(s[STATE_KEY].keys() == state.keys() for s in states.values())
    assert any(v.abs().sum() > 0 for v in states[0][STATE_KEY].values())


def test_prox_keeps_clients_closer_to_the_global_model(tmp_path):
    """FedProx's point: a large mu shrinks each client's update ||y_i - x||."""
    from fedtune.frameworks import get
    from fedtune.frameworks.base import Context

    def client_moves(mu):
        cfg = tiny_config(tmp_path, fed__prox_mu=mu, fed__rounds=1)
        fw = get("fedavg")(Context.build(cfg))
        down = fw.configure(1, 0)
        up, _ = split_extras(fw.fit(1, 0, down, None, None).message.tensors)
        return sum(float((up[k] - down.tensors[k]).norm() ** 2) for k in up) ** 0.5

    assert client_moves(10.0) < 0.8 * client_moves(0.0)


def test_split_client_part_runs_scaffold_and_prox(tmp_path):
    cfg = tiny_config(tmp_path, framework="split", split__split_layer=1, fed__strategy="scaffold",
                      fed__prox_mu=0.1, fed__rounds=2, data__test_size=50)
    summary, rundir = run_tiny(cfg)
    assert summary["rounds"] == 2
    states = ClientStates.of_run(rundir.path, rundir.load_checkpoint())
    assert all(STATE_KEY in s for s in states.values())
    c = rundir.load_checkpoint()["framework"]["strategy"]["c"]
    assert c.keys() == global_state(rundir).keys() and any(v.abs().sum() > 0 for v in c.values())


# Every new key through a killed and resumed run: the strategies' moments (Strategy.state_dict)
# and SCAFFOLD's client variates (client state) are checkpointed by the round loop.
RESUMED = {
    "fedavgm": dict(fed__strategy="fedavgm", fed__server_lr=0.5, fed__server_momentum=0.5),
    "fedadam": dict(fed__strategy="fedadam", fed__server_lr=0.02, fed__beta1=0.8, fed__beta2=0.9, fed__tau=1e-2),
    "fedyogi": dict(fed__strategy="fedyogi", fed__server_lr=0.02),
    "fedadagrad": dict(fed__strategy="fedadagrad", fed__server_lr=0.05),
    "scaffold+prox": dict(fed__strategy="scaffold", fed__server_lr=0.9, fed__prox_mu=0.1),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_resumed_run_ends_with_the_same_metrics(tmp_path, name):
    # 2 of 3 clients per round: a client's variate must outlive the rounds it sits out.
    kw = dict(fed__rounds=3, fed__fraction=0.67, data__test_size=50, **RESUMED[name])
    assert_resume_matches(tmp_path, kill_round=3, **kw)


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold"])
def test_flower_simulation_matches_inprocess(tmp_path, strategy):
    pytest.importorskip("flwr")
    kw = dict(fed__strategy=strategy, fed__server_lr=0.02 if strategy == "fedadam" else 1.0,
              fed__rounds=3, fed__fraction=0.67, data__test_size=50)
    ref, ref_dir = run_tiny(tiny_config(tmp_path / "a", **kw))
    sim, sim_dir = run_tiny(tiny_config(tmp_path / "b", runtime="flower-sim", **kw))
    assert abs(sim["final_test_accuracy"] - ref["final_test_accuracy"]) <= 1e-6
    assert abs(sim["final_test_loss"] - ref["final_test_loss"]) <= 1e-6
    key = lambda r: (r["round"], r["client"])  # noqa: E731
    a = {key(r): (r["bytes_up"], r["bytes_down"]) for r in ref_dir.metrics.records() if r["client"] != "server"}
    b = {key(r): (r["bytes_up"], r["bytes_down"]) for r in sim_dir.metrics.records() if r["client"] != "server"}
    assert a == b


@pytest.mark.parametrize("overrides, match", [
    ({"fed.strategy": "fedsgd"}, "fed.strategy"),
    ({"fed.server_lr": -0.1}, "fed.server_lr must be > 0; got -0.1"),
    ({"fed.beta1": 1.0}, r"fed.beta1 must be in \[0, 1\); got 1.0"),
    ({"fed.beta2": -0.5}, r"fed.beta2 must be in \[0, 1\); got -0.5"),
    ({"fed.server_momentum": 1.5}, "fed.server_momentum must be in"),
    ({"fed.tau": 0}, "fed.tau must be > 0; got 0"),
    ({"fed.prox_mu": -1}, "fed.prox_mu must be >= 0"),
    ({"framework": "kd", "fed.strategy": "scaffold"}, "kd does not send"),
])
def test_bad_strategy_settings_are_one_line_errors(overrides, match):
    from fedtune import config as configlib

    with pytest.raises(FedtuneError, match=match) as err:
        configlib.build_config("demo", None, overrides)
    assert "\n" not in str(err.value)


def test_report_labels_strategies_and_draws_accuracy_against_traffic(tmp_path):
    from fedtune.report import aggregate, load_runs, write_report
    from test_report import make_run

    runs = [({"fed.strategy": "fedavg"}, 0.5, 0.8), ({"fed.strategy": "fedavg", "fed.prox_mu": 0.1}, 0.5, 0.8),
            ({"fed.strategy": "fedadam", "fed.server_lr": 0.03}, 0.5, 0.8), ({"fed.strategy": "scaffold"}, 1.0, 0.9)]
    for values, mb, acc in runs:
        for seed in (0, 1):
            make_run(tmp_path, "fedavg", "classify", values, seed, [0.1, acc], mb, 2.0)
    labels = [s.label for s in aggregate(load_runs(tmp_path))]
    # Keys at their default are left out of a label, except the first swept key.
    assert sorted(labels) == ["strategy=fedadam, server_lr=0.03", "strategy=fedavg", "strategy=fedavg, prox_mu=0.1",
                              "strategy=scaffold"]
    write_report(tmp_path)
    assert (tmp_path / "accuracy_vs_traffic.png").stat().st_size > 10_000
    assert "accuracy_vs_traffic.png" in (tmp_path / "report.md").read_text()
