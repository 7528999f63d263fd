"""What makes the reported epsilons guarantees for what runs: Poisson sampling for DP-SGD and for
central DP's participation, per-example gradients from the fast path equal to the loop, the
accountants against Opacus's own computation, and the one-run audit beside them."""

import json
import math

import pytest
import scipy.stats
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune import cli
from fedtune.errors import FedtuneError
from fedtune.frameworks.base import Context
from fedtune.privacy import audit, dp_sgd, per_example, sampling
from fedtune.privacy.accounting import Accountant
from fedtune.privacy.central_dp import CentralDP
from fedtune.runtimes.rounds import sample_clients

from conftest import run_tiny, tiny_config
from test_frameworks import assert_resume_matches

SMALL = dict(data__private_size=60, data__public_size=16, data__test_size=16, kd__client_eval_size=0,
             split__split_layer=1, train__batch_size=8)


def records(rundir):
    return [json.loads(line) for line in (rundir.path / "metrics.jsonl").read_text().splitlines()]


def test_poisson_batch_sizes_follow_the_binomial():
    n, q, steps = 200, 0.05, 4000
    sizes = [len(rows) for rows in sampling.draws(7, 1, 0, 0, n, q, steps)]
    mean, var = sum(sizes) / steps, sum((s - n * q) ** 2 for s in sizes) / steps
    assert mean == pytest.approx(n * q, abs=4 * math.sqrt(n * q * (1 - q) / steps))
    assert var == pytest.approx(n * q * (1 - q), rel=0.1)
    # chi-square goodness of fit over the bins with enough mass (the tails pooled)
    edges = list(range(4, 17))
    observed = [sum(s <= 4 for s in sizes)] + [sizes.count(k) for k in edges[1:-1]] + [sum(s >= 16 for s in sizes)]
    binom = scipy.stats.binom(n, q)
    expected = [binom.cdf(4)] + [binom.pmf(k) for k in edges[1:-1]] + [binom.sf(15)]
    expected = [e * steps for e in expected]
    assert scipy.stats.chisquare(observed, expected).pvalue > 0.01
    assert sampling.draws(7, 1, 0, 0, n, q, 3) == sampling.draws(7, 1, 0, 0, n, q, 3)  # seeded: resume draws them again


@pytest.mark.parametrize("framework", ["fedavg", "kd", "split"])
def test_every_framework_draws_dp_sgd_batches_by_the_poisson_rule(framework):
    cfg = tiny_config(None, framework=framework, privacy__dp_sgd=True, **SMALL)
    ctx = Context.build(cfg)
    rows = ctx.client_rows(0)
    expected = sampling.draws(cfg.seed, 2, 0, 1, len(rows), 8 / len(rows), round(len(rows) / 8))
    if framework == "kd":
        from fedtune.frameworks.kd import KDFramework

        got = [s.private for s in KDFramework(ctx).client_steps(2, 0, 1, distilling=True)]
    else:  # fedavg's local_train and split's ClientRound.epoch both take ctx.client_batches
        got = ctx.client_batches(2, 0, 1)
    assert [b.index.tolist() for b in got] == expected
    assert len({len(b.index) for b in got}) > 1 or len(got) == 1  # sizes vary


def tiny_ctx(peft: str, framework: str = "fedavg"):
    cfg = tiny_config(None, framework=framework, model__peft=peft, model__lora_dropout=0.0, **SMALL)
    ctx = Context.build(cfg)
    for m in ctx.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ctx.model.double()
    return ctx


def assert_same(stacked, loop, params):
    assert len(loop) == stacked[0].shape[0]
    moved = 0.0
    for i in range(len(params)):
        for j, example in enumerate(loop):
            ref = torch.zeros_like(params[i]) if example[i] is None else example[i]
            assert torch.allclose(stacked[i][j], ref, atol=1e-6, rtol=0), (i, j)
            moved += float(ref.abs().sum())
    assert moved > 0


@pytest.mark.parametrize("peft", ["lora", "dora", "ia3", "prompt"])
def test_vmap_per_example_gradients_equal_the_loop(peft):
    """fedavg's (and every plain pass's) per-example gradients, and kd's private term, in float64."""
    ctx = tiny_ctx(peft)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    batch = ctx.client_batches(1, 0)[0]
    loop = list(dp_sgd.example_grads(ctx.model, params, ctx.task.loss, batch, []))
    stacked, _ = per_example.vmap_grads(ctx.model, params, ctx.task.loss, batch, peft == "prompt")
    assert_same(stacked, loop, params)
    # kd's mixed step: the same clipped private gradients plus the public term, vmap vs loop
    cfg = tiny_config(None, framework="kd", privacy__dp_sgd=True, privacy__noise_multiplier=0.0,
                      privacy__clip=0.01, model__peft=peft, **SMALL)
    grads = []
    public = lambda: 0.5 * ctx.task.loss(ctx.model, batch)  # noqa: E731
    for how in ("vmap", "loop"):
        dp = dp_sgd.ClientDP(cfg, 20)
        dp.per_example = how
        dp_sgd.private_step(ctx.model, params, ctx.task.loss, batch, dp, public, 0.5)
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("peft", ["lora", "dora", "ia3", "prompt"])
def test_vmap_split_client_gradients_equal_the_loop(peft):
    from fedtune.frameworks.split.client import example_grads
    from fedtune.frameworks.split.cut import CutModel

    ctx = tiny_ctx(peft, "split")
    part = CutModel(ctx.model, 1)
    params = [p for p in part.client.parameters() if p.requires_grad]
    batch = ctx.client_batches(1, 0)[0]
    packed = part.client_forward(batch.input_ids, batch.attention_mask)
    grad = torch.randn(packed.shape, generator=torch.Generator().manual_seed(0), dtype=packed.dtype)
    loop = list(example_grads(packed, grad, part.full_mask(batch.attention_mask), params))
    stacked = per_example.vmap_cut_grads(part, params, batch.input_ids, batch.attention_mask, grad, len(loop))
    assert_same(stacked, loop, params)


def test_rdp_epsilon_is_opacus_direct_computation_and_prv_is_tighter(tmp_path):
    _, rundir = run_tiny(tiny_config(tmp_path / "rdp", privacy__dp_sgd=True, **SMALL))
    rec = [r for r in records(rundir) if r["client"] == 0][-1]
    assert rec["accountant"] == "rdp" and rec["sampler"] == "poisson" and "epsilon_assumes" not in rec
    q, sigma, steps, delta = rec["sample_rate"], rec["noise_multiplier"], rec["dp_steps"], rec["delta"]
    assert (q, delta, steps) == (8 / 20, 1 / 200, 2 * round(20 / 8))
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    direct, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                                 orders=orders), delta=delta)
    assert rec["epsilon"] == pytest.approx(direct, rel=1e-12)
    _, prv_dir = run_tiny(tiny_config(tmp_path / "prv", privacy__dp_sgd=True, privacy__accountant="prv", **SMALL))
    prv = [r for r in records(prv_dir) if r["client"] == 0][-1]
    assert prv["accountant"] == "prv" and 0 < prv["epsilon"] <= rec["epsilon"]
    many = {kind: Accountant(kind=kind) for kind in ("rdp", "prv")}
    for acct in many.values():
        acct.step(1.0, 0.02, 500)
    assert many["prv"].epsilon(1e-5) < many["rdp"].epsilon(1e-5)


def test_shuffle_sampler_says_what_its_epsilon_assumes(tmp_path):
    _, rundir = run_tiny(tiny_config(tmp_path, privacy__dp_sgd=True, privacy__sampler="shuffle",
                                     privacy__per_example="loop", **SMALL))
    rec = [r for r in records(rundir) if r["client"] == 0][-1]
    assert rec["epsilon_assumes"] == "poisson" and rec["sampler"] == "shuffle"
    assert rec["dp_steps"] == 2 * math.ceil(20 / 8)


def test_prv_accountant_poisson_batches_and_canaries_resume_exactly(tmp_path):
    a = assert_resume_matches(tmp_path, privacy__dp_sgd=True, privacy__accountant="prv", fed__rounds=3,
                              privacy__audit=True, privacy__audit_canaries=6, data__private_size=48,
                              data__test_size=16, train__batch_size=8)
    last = [r for r in a if r["client"] == 0][-1]
    assert last["accountant"] == "prv" and last["dp_steps"] == 3 * round(last["num_samples"] / 8)
    whole, resumed = (json.loads((tmp_path / d / "run" / audit.AUDIT).read_text()) for d in ("a", "b"))
    assert whole == resumed


def test_central_dp_participation_is_poisson_at_the_fraction():
    cfg = tiny_config(None, privacy__central_dp=True, fed__clients=20, fed__fraction=0.3)
    rounds = 1000
    joined = [sample_clients(cfg, r) for r in range(1, rounds + 1)]
    sizes = [len(j) for j in joined]
    assert sum(sizes) / rounds == pytest.approx(6.0, abs=4 * math.sqrt(20 * 0.3 * 0.7 / rounds))
    assert sum((s - 6) ** 2 for s in sizes) / rounds == pytest.approx(20 * 0.3 * 0.7, rel=0.15)
    per_client = [sum(c in j for j in joined) / rounds for c in range(20)]
    assert all(abs(f - 0.3) < 4 * math.sqrt(0.3 * 0.7 / rounds) for f in per_client)
    fixed = tiny_config(None, fed__clients=20, fed__fraction=0.3)  # without central DP: round(k) clients
    assert all(len(sample_clients(fixed, r)) == 6 for r in range(1, 20))


def test_central_dp_divides_by_the_expected_clients():
    cfg = tiny_config(None, privacy__central_dp=True, fed__clients=4, fed__fraction=0.5,
                      privacy__update_noise_multiplier=0.0, privacy__update_clip=1e9)
    dp = CentralDP(cfg)
    current = {"w": torch.zeros(3)}
    ups = [({"w": torch.full((3,), float(i))}, 1.0) for i in (1, 2, 3)]  # 3 joined, 2 expected
    [(out, _)], record = dp.privatize(current, ups)
    assert torch.allclose(out["w"], torch.full((3,), 6.0 / 2))
    assert record["sample_rate"] == 0.5 and record["delta"] == 1 / 40 and record["accountant"] == "rdp"


def test_a_round_no_client_joined_is_logged_skipped_and_resumes(tmp_path):
    keys = dict(privacy__central_dp=True, fed__fraction=0.3, fed__rounds=6, data__private_size=48,
                data__test_size=16)  # seed 0 draws [], [1], [], [0], [0], [0, 2]
    a = assert_resume_matches(tmp_path, kill_round=6, **keys)
    server = {r["round"]: r for r in a if r["client"] == "server"}
    assert server[1]["skipped"] == "no client joined" and server[1]["clients"] == []
    assert server[3]["clients"] == [] and server[2]["clients"] == [1] and server[6]["clients"] == [0, 2]
    assert [server[r]["dp_steps"] for r in range(1, 7)] == [1, 2, 3, 4, 5, 6]  # the accountant counts every round
    assert server[1]["epsilon"] < server[6]["epsilon"] < math.inf
    assert [r["round"] for r in a if r["client"] != "server"] == [2, 4, 5, 6, 6]


def test_audit_p_value_delta_term_matches_the_theorem_by_hand():
    # m = r = 2 canaries, v = 2 right. eps = 0: q = 1/2, beta = P[Bin(2, 1/2) >= 2] = 1/4; the
    # delta term's alpha = max_i P[2 > Bin >= 2 - i] / i = max(1/2, 3/4 / 2) = 1/2, times 2 m delta.
    assert audit.p_value(2, 2, 2, 0.0, 0.1) == pytest.approx(0.25 + 0.5 * 0.1 * 2 * 2)
    # eps = ln 3: q = 3/4, beta = 9/16; alpha = max(P[Bin = 1], (P[Bin = 1] + P[Bin = 0]) / 2) = 3/8
    assert audit.p_value(2, 2, 2, math.log(3), 0.01) == pytest.approx(9 / 16 + 3 / 8 * 0.01 * 2 * 2)
    assert audit.p_value(2, 2, 2, 0.0, 0.5) == 1.0  # a p-value is capped at 1
    # a larger delta can only weaken the bound the same guesses prove
    assert audit.epsilon_lower_bound(60, 30, 28, 1e-3) < audit.epsilon_lower_bound(60, 30, 28, 0.0)


def test_audit_bound_matches_the_closed_form_and_grows_with_correct_guesses():
    # all r guesses right, delta 0: the bound solves q^r = p with q = e^eps / (1 + e^eps)
    q = 0.05 ** (1 / 30)
    assert audit.epsilon_lower_bound(60, 30, 30, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert audit.epsilon_lower_bound(60, 30, 15, 1e-5) == 0.0  # chance level proves nothing
    assert 0 < audit.epsilon_lower_bound(60, 30, 25, 1e-5) < audit.epsilon_lower_bound(60, 30, 30, 1e-5)
    assert audit.auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and audit.auc([1.0], [1.0]) == 0.5


def canary_run(tmp_path, **keys):
    cfg = tiny_config(tmp_path, privacy__audit=True, privacy__audit_canaries=20, fed__clients=1, fed__rounds=1,
                      data__private_size=10, data__test_size=40, data__public_size=16, train__local_epochs=30,
                      train__lr=0.01, train__batch_size=8, **keys)
    _, rundir = run_tiny(cfg)
    return rundir, json.loads((rundir.path / audit.AUDIT).read_text())


def test_audit_finds_memorized_canaries_without_dp(tmp_path):
    rundir, found = canary_run(tmp_path)
    assert found["mechanism"] is None and found["audit_epsilon"] > 0.1 and found["mia_auc"] > 0.8
    assert found["audit_guesses"] == 20 and found["audit_delta"] == 1e-5


def test_audit_stays_below_the_accountant_under_dp(tmp_path):
    rundir, found = canary_run(tmp_path, privacy__dp_sgd=True, privacy__noise_multiplier=1.0)
    assert found["mechanism"] == "dp_sgd" and found["audit_epsilon"] <= found["accountant_epsilon"] < math.inf
    (rundir.path / audit.AUDIT).unlink()
    assert cli.main(["audit", str(rundir.path)]) == 0  # the CLI rebuilds the model and canaries: the same figures
    again = json.loads((rundir.path / audit.AUDIT).read_text())
    assert again["audit_epsilon"] == found["audit_epsilon"] and again["mia_auc"] == pytest.approx(found["mia_auc"])


@pytest.mark.parametrize("overrides, message", [
    ({"privacy__sampler": "fixed"}, "privacy.sampler must be one of poisson, shuffle"),
    ({"privacy__per_example": "hooks"}, "privacy.per_example must be one of vmap, loop"),
    ({"privacy__accountant": "gdp"}, "privacy.accountant must be one of rdp, prv"),
    ({"privacy__audit_canaries": 3}, "privacy.audit_canaries must be an even number"),
    ({"privacy__dp_sgd": True, "framework": "split", "split__sample": "loss", "split__samples_per_round": 8},
     "privacy.sampler=poisson draws each step's rows at random"),
    ({"privacy__dp_sgd": True, "framework": "zo"}, "zo takes zeroth-order steps"),
    ({"privacy__audit": True, "train__task": "sft"}, "privacy.audit plants labelled canaries"),
])
def test_bad_new_privacy_values_are_one_line_errors(overrides, message):
    with pytest.raises(FedtuneError, match=message) as err:
        tiny_config(None, **overrides)
    assert "\n" not in str(err.value)
