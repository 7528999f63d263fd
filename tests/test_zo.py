"""Zeroth-order tuning with shared seeds (frameworks/zo.py): exact replay, the bytes of the
pairs, one step by hand in float64, learning on an easy task, one-line errors, and a fourth
framework in the report's Table I. The battery in test_frameworks.py covers bytes ==
serialized, state_dict, kill-and-resume and flower-sim for zo as for every framework."""

from __future__ import annotations

import csv
import math
import random

import pytest
import torch
from torch import nn

from conftest import run_tiny, tiny_config
from fedtune.errors import FedtuneError
from fedtune.frameworks.base import Context
from fedtune.frameworks.zo import ZOFramework, direction, replay, zo_step
from fedtune.wire import Message, deserialize, serialize


def tunable_values(fw):
    return [p.detach().clone() for p in fw.params]


def replay_client_of_round_2(fw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Round 1 for clients 0 and 1 (so round 2 starts from a global model that is not w0), then
    client 0's round 2; leaves ``fw`` holding the global model rebuilt from the pairs sent down
    with client 0's uploaded pairs replayed on it. -> (that global model, client 0's model)."""
    ups = {}
    for cid in (0, 1):
        result = fw.fit(1, cid, deserialize(serialize(fw.configure(1, cid))), None, None)
        ups[cid] = (deserialize(serialize(result.message)), result.metrics)
    fw.aggregate(1, ups)
    down = deserialize(serialize(fw.configure(2, 0)))
    assert len(down.tensors["seed"]) > 0
    result = fw.fit(2, 0, down, None, None)
    client = tunable_values(fw)
    up = deserialize(serialize(result.message))
    fw.rebuild(down.tensors["seed"], down.tensors["grad"])
    start = tunable_values(fw)
    replay(fw.params, [fw.candidates[j] for j in up.tensors["seed"].tolist()], up.tensors["grad"].tolist(), fw.cfg.zo.lr)
    return start, client


@pytest.mark.parametrize("params", ["tunable", "all"])
def test_replaying_the_uploaded_pairs_reproduces_the_client_model_bitwise(tmp_path, params):
    """Bitwise, not to float error: the client restores w from a copy after its two
    evaluations and updates with the float32 g it uploads, so replaying its pairs performs
    the very same float operations on the very same values, in the same order."""
    fw = ZOFramework(Context.build(tiny_config(tmp_path, framework="zo", zo__steps=15, zo__params=params)))
    start, client = replay_client_of_round_2(fw)
    assert all(p.grad is None for p in fw.ctx.model.parameters())  # no backward pass ran
    assert all(torch.equal(a, b) for a, b in zip(tunable_values(fw), client))
    assert not all(torch.equal(a, b) for a, b in zip(start, client))  # the client did move
    if params == "all":  # the frozen base moved too
        names = [n for n, _ in fw.ctx.model.named_parameters() if "original_module" not in n]
        moved = {n for n, a, b in zip(names, start, client) if not torch.equal(a, b)}
        assert any("lora" not in n and "score" not in n for n in moved)


def test_aggregated_pairs_rebuild_the_sample_weighted_mean_of_the_clients(tmp_path):
    """FedKSeed's aggregation is FedAvg's in pair form: the rebuilt global model is the clients'
    models averaged by samples (to float error: the replay sums the steps in another order)."""
    fw = ZOFramework(Context.build(tiny_config(tmp_path, framework="zo", zo__steps=10, data__partition="dirichlet")))
    ups, models, sizes = {}, [], []
    for cid in (0, 1, 2):
        result = fw.fit(1, cid, fw.configure(1, cid), None, None)
        ups[cid] = (result.message, result.metrics)
        models.append(tunable_values(fw))
        sizes.append(result.metrics["num_samples"])
    assert len(set(sizes)) > 1  # unequal clients: a plain mean would differ
    fw.aggregate(1, ups)
    fw.global_model()
    for i, p in enumerate(fw.params):
        mean = sum(m[i].double() * n for m, n in zip(models, sizes)) / sum(sizes)
        assert torch.allclose(p.double(), mean, atol=1e-6, rtol=0)


def test_malformed_uploads_are_rejected_and_the_rest_aggregated(tmp_path):
    fw = ZOFramework(Context.build(tiny_config(tmp_path, framework="zo", zo__seeds=8)))
    good = Message({"seed": torch.tensor([3, 3, 5], dtype=torch.int32), "grad": torch.tensor([1.0, 2.0, -1.0])})
    bad = {
        1: Message({"seed": torch.tensor([8], dtype=torch.int32), "grad": torch.tensor([1.0])}),
        2: Message({"seed": torch.tensor([0], dtype=torch.int32), "grad": torch.tensor([float("nan")])}),
        3: Message({"seed": torch.tensor([0, 1], dtype=torch.int32), "grad": torch.tensor([1.0])}),
    }
    results = {0: (good, {"num_samples": 10}), **{cid: (m, {"num_samples": 10}) for cid, m in bad.items()}}
    record = fw.aggregate(1, results)
    assert record["rejected"] == {"1": "seed indices outside [0, 8)", "2": "projected gradients hold NaN or inf",
                                  "3": "the upload is not a list of (seed, grad) pairs"}
    assert fw.pool.tolist() == [0, 0, 0, 3.0, 0, -1.0, 0, 0]  # the good client alone, weight 1
    assert record["zo_seeds_used"] == 2


def test_central_dp_clips_each_clients_seed_space_contribution_and_noises_every_seed(tmp_path):
    """privacy.central_dp under zo: client i's round contribution v_i[j] (the sum of its g with
    seed j) is clipped to update_clip in L2, the clipped v_i are summed, N(0, (sigma x clip)^2)
    lands on all K seeds, and the sum is divided by the expected clients (fraction x clients)."""
    cfg = dict(framework="zo", zo__seeds=8, fed__clients=4, privacy__central_dp=True, privacy__update_clip=2.0)
    msgs = {0: Message({"seed": torch.tensor([3, 3, 5], dtype=torch.int32), "grad": torch.tensor([3.0, 1.0, 3.0])}),
            1: Message({"seed": torch.tensor([1], dtype=torch.int32), "grad": torch.tensor([-1.0])})}
    results = {cid: (m, {"num_samples": 10 * (cid + 1)}) for cid, m in msgs.items()}
    fw = ZOFramework(Context.build(tiny_config(tmp_path, privacy__update_noise_multiplier=0.0, **cfg)))
    record = fw.aggregate(1, results)
    # v_0 = 4 e_3 + 3 e_5 (norm 5) -> x 2/5; v_1 = -e_1 (norm 1) stays; every client weighs 1, over 4 expected
    assert fw.pool.tolist() == pytest.approx([0, -1 / 4, 0, 1.6 / 4, 0, 1.2 / 4, 0, 0])
    assert record["epsilon"] == math.inf and record["dp_steps"] == 1 and record["sample_rate"] == 1.0
    noised = ZOFramework(Context.build(tiny_config(tmp_path, privacy__update_noise_multiplier=1.0, **cfg)))
    record = noised.aggregate(1, results)
    assert int(noised.pool.count_nonzero()) == 8 and 0 < record["epsilon"] < math.inf  # no seed is left bare
    state = noised.state_dict()  # the accountant resumes with the pool
    again = ZOFramework(Context.build(tiny_config(tmp_path, privacy__update_noise_multiplier=1.0, **cfg)))
    again.load_state_dict(state)
    assert again.central_dp.record() == noised.central_dp.record()


def test_bytes_per_round_are_the_pairs_sent(tmp_path):
    steps = 12
    summary, rundir = run_tiny(tiny_config(tmp_path, framework="zo", zo__steps=steps))
    clients = [r for r in rundir.metrics.records() if r["client"] != "server"]
    pairs = lambda n: Message({"seed": torch.zeros(n, dtype=torch.int32), "grad": torch.zeros(n)})  # noqa: E731
    for r in clients:
        assert r["zo_steps"] == steps
        assert r["bytes_up"] == len(serialize(pairs(steps)))  # (int32 seed index, float32 g) per step
        assert r["bytes_down"] == len(serialize(pairs(r["zo_pairs_down"])))
    assert all(r["zo_pairs_down"] == 0 for r in clients if r["round"] == 1)  # nothing aggregated yet
    assert all(0 < r["zo_pairs_down"] <= 3 * steps for r in clients if r["round"] == 2)  # round 1's seeds
    # 8 bytes a step plus the header: tiny next to the tunable state fedavg sends.
    assert all(r["bytes_up"] < 8 * steps + 200 for r in clients)


def test_one_step_equals_a_hand_computation_in_float64():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], dtype=torch.float64)
    y = [1, 0]
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    z = direction(1234, params)
    eps, lr = 1e-3, 0.1

    def hand_loss(shift):  # cross-entropy of softmax(x W^T + b), written out
        W = (w0[0] + shift * z[0]).tolist()
        b = (w0[1] + shift * z[1]).tolist()
        total = 0.0
        for row, label in zip(x.tolist(), y):
            logits = [sum(wi * xi for wi, xi in zip(W[k], row)) + b[k] for k in range(2)]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[label]
        return total / len(y)

    g, plus, minus = zo_step(params, z, lambda: nn.functional.cross_entropy(model(x), torch.tensor(y)), eps, lr)
    assert plus == pytest.approx(hand_loss(eps), rel=1e-12)
    assert minus == pytest.approx(hand_loss(-eps), rel=1e-12)
    g_hand = (hand_loss(eps) - hand_loss(-eps)) / (2 * eps)
    assert g == pytest.approx(g_hand, rel=1e-6)  # g travels as float32
    for p, p0, zi in zip(params, w0, z):
        assert torch.allclose(p, p0 - lr * g * zi, rtol=0, atol=1e-15)
    # and g estimates the directional derivative (error O(eps^2))
    model.weight.data, model.bias.data = w0[0].clone(), w0[1].clone()
    nn.functional.cross_entropy(model(x), torch.tensor(y)).backward()
    exact = sum((p.grad * zi).sum() for p, zi in zip(params, z)).item()
    assert g == pytest.approx(exact, rel=1e-4)


def easy_data(path):
    """Two intents told apart by the last word; the rest is noise from one vocabulary."""
    rng = random.Random(0)
    words = "the a bank card money transfer account pay fee help please my when why how can".split()
    path.mkdir()
    for name, n in (("train.csv", 300), ("test.csv", 100)):
        with (path / name).open("w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["text", "category"])
            for i in range(n):
                noise = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
                out.writerow([f"{noise} {'cat' if i % 2 else 'dog'}", "beta" if i % 2 else "alpha"])
    return path


def test_zo_learns_an_easy_task(tmp_path):
    """The test loss falls from the initial model's (~0.6) to a fraction of it, far under
    ln 2 = 0.69 (a balanced guess), on 100 balanced test rows: no chance of passing by luck.
    LoRA r=1 at alpha=1: at the default alpha=32 a rank-1 adapter's scale (32) makes the
    random walk along its directions unstable at any rate that learns in 80 steps."""
    cfg = tiny_config(tmp_path, framework="zo", data__path=str(easy_data(tmp_path / "easy")), data__public_size=0,
                      data__private_size=300, data__test_size=100, data__max_labels=0, model__lora_r=1,
                      model__lora_alpha=1, zo__steps=40, zo__lr=1e-2, fed__rounds=2)
    ctx = Context.build(cfg)
    before = ctx.task.evaluate(ctx.model, ctx.test_batches(), ctx.device)["loss"]
    summary, _ = run_tiny(cfg)
    assert before > 0.4
    assert summary["final_test_loss"] < min(0.2, 0.4 * before)
    assert summary["final_test_accuracy"] >= 0.95


@pytest.mark.parametrize("key, value, message", [
    ("zo.seeds", 0, "zo.seeds must be in [1, 2**31 - 1]; got 0"),
    ("zo.eps", 0, "zo.eps must be a finite number > 0; got 0.0"),
    ("zo.eps", "nan", "zo.eps must be a finite number > 0; got nan"),
    ("zo.lr", -1e-3, "zo.lr must be a finite number > 0; got -0.001"),
    ("zo.steps", -1, "zo.steps must be >= 0 (0 = one step per batch); got -1"),
    ("zo.params", "lora", "zo.params must be one of tunable, all; got 'lora'"),
])
def test_bad_values_are_one_line_errors(key, value, message):
    with pytest.raises(FedtuneError) as exc:
        tiny_config(**{"framework": "zo", key.replace(".", "__"): value})
    assert str(exc.value) == message


def test_a_weight_strategy_with_zo_is_a_one_line_error():
    tiny_config(framework="fedavg", fed__strategy="fedadam")  # fine where weights are uploaded
    with pytest.raises(FedtuneError, match=r"^fed.strategy='fedadam' aggregates uploaded weights; zo uploads seed pairs"):
        tiny_config(framework="zo", fed__strategy="fedadam")


def test_zero_steps_means_one_step_per_batch(tmp_path):
    cfg = tiny_config(tmp_path, framework="zo", zo__steps=0, train__local_epochs=2, train__batch_size=32)
    fw = ZOFramework(Context.build(cfg))
    rows = len(fw.ctx.data.clients[0])
    assert len(fw.local_batches(1, 0)) == 2 * math.ceil(rows / 32)
    fw.cfg.zo.steps = 25
    assert len(fw.local_batches(1, 0)) == 25  # cycling through reshuffled passes


def test_report_ranks_a_fourth_framework_without_a_paper_rank(tmp_path):
    from test_report import RUNS, make_run
    from fedtune.report import write_report

    root = tmp_path / "sweep"
    for spec in RUNS:
        make_run(root, *spec)
    make_run(root, "zo", "classify", {}, 0, [0.1, 0.3], 0.0001, 5.0)
    md = write_report(root, tmp_path / "out").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header.endswith("| FedKSeed (zo) |")
    assert "| 30.0% · **4** (-) |" in md  # accuracy: last of four, no rank in the paper
    assert "| 0.0002 · **1** (-) |" in md  # the least traffic (up + down)
