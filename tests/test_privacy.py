"""DP-SGD on the clients, DP-FedAvg at the server, their accounting and resume, and their
one-line config errors."""

import json
import math

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune import models
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.frameworks import FRAMEWORKS
from fedtune.frameworks.base import Context
from fedtune.privacy import dp_sgd
from fedtune.privacy.accounting import Accountant
from fedtune.privacy.central_dp import CentralDP
from fedtune.strategies import STRATEGIES
from fedtune.training import train_pass

from conftest import run_tiny, tiny_config
from test_frameworks import assert_resume_matches


@pytest.fixture(scope="module")
def ctx():
    cfg = tiny_config(None, model__lora_dropout=0.0, data__private_size=60, data__test_size=20)
    ctx = Context.build(cfg)
    for m in ctx.model.modules():  # per-example and batched passes must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return ctx


def records(rundir):
    return [json.loads(line) for line in (rundir.path / "metrics.jsonl").read_text().splitlines()]


def test_per_example_gradients_are_clipped_to_the_clip(ctx):
    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    batch = ctx.client_batches(1, 0)[0]
    raw = list(dp_sgd.example_grads(model, params, ctx.task.loss, batch, []))
    norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs if g is not None))  # noqa: E731
    clip = 0.5 * min(norm(g) for g in raw)  # every example is over the clip
    assert len(raw) == len(batch.labels)
    for g in raw:
        clipped = dp_sgd.clip_example(g, clip)
        assert norm(clipped) <= clip * (1 + 1e-6) and norm(clipped) == pytest.approx(clip, rel=1e-5)
    small = dp_sgd.clip_example(raw[0], 10 * norm(raw[0]))  # under the clip: unchanged
    assert all(torch.equal(a, b) for a, b in zip(small, raw[0]) if a is not None)


def test_accountant_matches_the_reference_rdp_analysis():
    q, sigma, steps, delta = 0.01, 1.1, 1000, 1e-5
    acct = Accountant()
    acct.step(sigma, q, steps)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    reference, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                                    orders=orders), delta=delta)
    assert acct.epsilon(delta) == pytest.approx(reference, rel=1e-12)
    assert 0.5 < acct.epsilon(delta) < 2.0  # the subsampled Gaussian's known ballpark for these settings
    resumed = Accountant(acct.state_dict())
    resumed.step(sigma, q, 10)
    acct.step(sigma, q, 10)
    assert resumed.epsilon(delta) == acct.epsilon(delta) > reference
    zero = Accountant()
    zero.step(0.0, q)
    assert zero.epsilon(delta) == math.inf and Accountant().epsilon(delta) == 0.0


def test_no_noise_and_infinite_clip_is_plain_training(ctx):
    cfg = RunConfig()
    cfg.privacy.dp_sgd, cfg.privacy.noise_multiplier, cfg.privacy.clip = True, 0.0, math.inf
    cfg.privacy.sampler = "shuffle"  # the batches below are shuffled slices: each divided by its own size
    start = models.get_tunable(ctx.model)
    batches = ctx.client_batches(1, 0)
    train_pass(ctx.model, batches, ctx.cfg.train, ctx.device, ctx.flops, ctx.task.loss)
    plain = models.get_tunable(ctx.model)
    models.set_tunable(ctx.model, start)
    dp = dp_sgd.ClientDP(cfg, 20)
    dp_sgd.train_pass(ctx.model, batches, ctx.cfg.train, ctx.device, ctx.flops, ctx.task.loss, dp)
    private = models.get_tunable(ctx.model)
    models.set_tunable(ctx.model, start)
    assert any(not torch.equal(plain[k], start[k]) for k in plain)
    for k in plain:
        assert torch.allclose(private[k], plain[k], atol=1e-5, rtol=1e-4), k
    # and with a finite clip and noise it is not plain training
    cfg.privacy.noise_multiplier, cfg.privacy.clip = 1.0, 0.1
    dp_sgd.train_pass(ctx.model, batches, ctx.cfg.train, ctx.device, ctx.flops, ctx.task.loss,
                      dp_sgd.ClientDP(cfg, 20))
    noised = models.get_tunable(ctx.model)
    models.set_tunable(ctx.model, start)
    assert any(not torch.allclose(noised[k], plain[k], atol=1e-4) for k in plain)


def test_target_epsilon_calibrates_the_noise():
    cfg = tiny_config(None, privacy__dp_sgd=True, privacy__target_epsilon=2.0)
    dp = dp_sgd.ClientDP(cfg, 100)
    steps = dp_sgd.planned_steps(cfg, 100)
    assert steps == 2 * round(100 / 16)  # Poisson: round(1/q) steps an epoch
    dp.accountant.step(dp.noise_multiplier, dp.sample_rate, steps)
    assert dp.accountant.epsilon(dp.delta) == pytest.approx(2.0, rel=0.02) and dp.delta == 1 / (10 * 100)
    shuffle = tiny_config(None, privacy__dp_sgd=True, privacy__target_epsilon=2.0, privacy__sampler="shuffle")
    assert dp_sgd.planned_steps(shuffle, 100) == 2 * math.ceil(100 / 16)
    kd = tiny_config(None, framework="kd", privacy__dp_sgd=True, privacy__target_epsilon=2.0)
    assert dp_sgd.planned_steps(kd, 100) == steps  # kd's public rows ride in the private steps
    assert dp_sgd.ClientDP(kd, 100).noise_multiplier == pytest.approx(dp.noise_multiplier)


def central(noise, clip, clients=4):
    cfg = RunConfig()
    cfg.fed.clients = clients
    cfg.privacy.central_dp, cfg.privacy.update_noise_multiplier, cfg.privacy.update_clip = True, noise, clip
    return CentralDP(cfg)


def test_central_dp_without_noise_and_a_large_clip_is_fedavg():
    g = torch.Generator().manual_seed(1)
    current = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    updates = [({k: v + torch.randn(v.shape, generator=g) for k, v in current.items()}, 25.0) for _ in range(4)]
    [(noised, _)], _ = central(0.0, 1e9).privatize(current, updates)
    fedavg = STRATEGIES.load("fedavg")(RunConfig()).aggregate(current, updates)
    for k in current:
        assert torch.allclose(noised[k], fedavg[k], atol=1e-6)


def test_central_dp_clips_each_update_and_noises_the_sum():
    current = {"w": torch.zeros(20000)}
    big = {"w": torch.full((20000,), 1.0)}  # norm 141 -> clipped to 2: each entry 2/141
    [(out, _)], _ = central(0.0, 2.0).privatize(current, [(big, 1.0)] * 4)
    assert torch.allclose(out["w"], torch.full((20000,), 2.0 / math.sqrt(20000) * 4 / 4))
    dp = central(0.5, 2.0)
    [(out, _)], _ = dp.privatize(current, [(current, 1.0)] * 4)
    assert out["w"].std().item() == pytest.approx(0.5 * 2.0 / 4, rel=0.05)  # std sigma * clip / clients
    _, record = dp.privatize(current, [(current, 1.0)] * 4)
    assert record["delta"] == 1 / 40 and dp.accountant.steps == 2 and 0 < record["epsilon"] < math.inf


@pytest.mark.parametrize("framework", ["fedavg", "kd", "split"])
def test_every_framework_reports_a_growing_epsilon(tmp_path, framework):
    cfg = tiny_config(tmp_path, framework=framework, privacy__dp_sgd=True, privacy__noise_multiplier=1.3,
                      data__private_size=60, data__public_size=16, data__test_size=16, split__split_layer=1,
                      kd__client_eval_size=0, train__batch_size=8)
    _, rundir = run_tiny(cfg)
    by_client = [r for r in records(rundir) if r["client"] == 0]
    assert [r["round"] for r in by_client] == [1, 2]
    assert 0 < by_client[0]["epsilon"] < by_client[1]["epsilon"] < math.inf and by_client[0]["delta"] == 1 / 200
    steps = 2 * round(20 / 8)  # kd too: its public rows ride in the private steps and are not counted
    assert by_client[1]["dp_steps"] == steps
    reference = Accountant()
    reference.step(1.3, 8 / 20, steps)  # q = batch / client rows
    assert by_client[1]["epsilon"] == pytest.approx(reference.epsilon(1 / 200), rel=1e-12)
    assert by_client[1]["sample_rate"] == 8 / 20 and by_client[1]["accountant"] == "rdp"
    if framework == "kd":  # round 2 distilled under DP-SGD (kd.client_kd_weight = 0.5 by default)
        assert by_client[1]["client_kd_loss"] > 0 and by_client[1]["client_flops_kd"] > 0


@pytest.mark.parametrize("framework", [f for f in FRAMEWORKS.names if not FRAMEWORKS.has(f, "uploads_outputs")
                                       or FRAMEWORKS.has(f, "uploads_weights")])
def test_every_framework_that_takes_central_dp_reports_its_epsilon(tmp_path, framework):
    """No framework accepts privacy.central_dp and ignores it: every round's server record carries
    the accountant's growing epsilon at delta = 1/(10 x clients)."""
    cfg = tiny_config(tmp_path, framework=framework, privacy__central_dp=True, privacy__update_noise_multiplier=1.0,
                      split__split_layer=1, zo__steps=4)
    _, rundir = run_tiny(cfg)
    server = [r for r in records(rundir) if r["client"] == "server"]
    assert [r["dp_steps"] for r in server] == [1, 2] and server[0]["delta"] == 1 / (10 * cfg.fed.clients)
    assert 0 < server[0]["epsilon"] < server[1]["epsilon"] < math.inf


def test_dp_and_attack_keys_resume_to_the_same_metrics(tmp_path):
    keys = dict(privacy__dp_sgd=True, privacy__central_dp=True, privacy__update_noise_multiplier=0.5,
                fed__attack="gaussian", fed__malicious_clients=[1], fed__strategy="median", fed__rounds=3,
                data__private_size=48, data__test_size=16)
    a = assert_resume_matches(tmp_path, **keys)
    server = [r for r in a if r["client"] == "server"]
    assert server[0]["epsilon"] < server[2]["epsilon"] and all(r["malicious"] for r in a if r["client"] == 1)


@pytest.mark.parametrize("overrides, message", [
    ({"privacy__clip": -1.0}, "privacy.clip must be > 0"),
    ({"privacy__update_clip": 0.0}, "privacy.update_clip must be > 0"),
    ({"privacy__delta": 1.0}, r"privacy.delta must be in \[0, 1\)"),
    ({"privacy__noise_multiplier": -0.1}, "privacy.noise_multiplier must be >= 0"),
    ({"framework": "kd", "privacy__central_dp": True}, "kd uploads outputs"),
])
def test_bad_privacy_values_are_one_line_errors(overrides, message):
    with pytest.raises(FedtuneError, match=message) as err:
        tiny_config(None, **overrides)
    assert "\n" not in str(err.value)


def test_output_noise_clips_each_example_and_adds_noise():
    from fedtune.privacy.outputs import clip_and_noise

    x = torch.arange(1.0, 13.0).reshape(6, 2)
    out = clip_and_noise(x, [2, 4], clip=1.0, noise_multiplier=0.0)
    assert out[:2].norm().item() == pytest.approx(1.0) and out[2:].norm().item() == pytest.approx(1.0)
    assert torch.allclose(out[:2] / out[:2].norm(), x[:2] / x[:2].norm())  # scaled, not reshaped
    torch.manual_seed(0)
    noisy = clip_and_noise(torch.zeros(200, 100), [1] * 200, clip=2.0, noise_multiplier=0.5)
    assert noisy.std().item() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("framework", ["split", "kd"])
def test_noised_sends_report_their_epsilon(tmp_path, framework):
    cfg = tiny_config(tmp_path, framework=framework, privacy__output_noise_multiplier=2.0, privacy__output_clip=1.0,
                      fed__rounds=1, data__private_size=48, data__public_size=16, data__test_size=16,
                      split__split_layer=1, kd__client_eval_size=0)
    _, rundir = run_tiny(cfg)
    rec = next(r for r in records(rundir) if r["client"] == 0)
    # one release per epoch (split) or round (kd), replacement sensitivity 2 x clip (x sqrt(rows) for kd)
    sigma = 2.0 / 2 if framework == "split" else 2.0 / (2 * math.sqrt(16))
    acct = Accountant()
    acct.step(sigma, 1.0)
    assert rec["output_epsilon"] == pytest.approx(acct.epsilon(1 / 16)) and rec["output_delta"] == 1 / 16
    with pytest.raises(FedtuneError, match="fedavg sends weights"):
        tiny_config(None, privacy__output_noise_multiplier=1.0)


def test_split_example_gradients_sum_to_the_batch_gradient(ctx):
    from fedtune.frameworks.split import SplitFramework
    from fedtune.frameworks.split.cut import CutModel

    split = CutModel(ctx.model, 1)
    params = [p for p in split.client.parameters() if p.requires_grad]
    batch = ctx.client_batches(1, 0)[0]
    packed = split.client_forward(batch.input_ids, batch.attention_mask)
    grad = torch.randn(packed.shape, generator=torch.Generator().manual_seed(0))
    whole = torch.autograd.grad(packed, params, grad, retain_graph=True, allow_unused=True)
    each = list(SplitFramework.example_grads(packed, grad, batch.attention_mask, params))
    assert len(each) == len(batch.labels)
    for i, w in enumerate(whole):
        if w is not None:
            assert torch.allclose(sum(e[i] for e in each) / len(each), w, atol=1e-6)


@pytest.fixture(scope="module")
def kd():
    from fedtune.frameworks.kd import KDFramework

    cfg = tiny_config(None, framework="kd", model__lora_dropout=0.0, data__private_size=60, data__public_size=24,
                      data__test_size=16, train__batch_size=8, kd__client_eval_size=0)
    ctx = Context.build(cfg)
    for m in ctx.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fw = KDFramework(ctx)
    teacher = torch.softmax(torch.randn(fw.rows, fw.width, generator=torch.Generator().manual_seed(3)), -1)
    return fw, teacher


def kd_dp(clip, noise):
    cfg = RunConfig()
    cfg.framework, cfg.train.batch_size = "kd", 8
    cfg.privacy.dp_sgd, cfg.privacy.noise_multiplier, cfg.privacy.clip = True, noise, clip
    cfg.privacy.sampler = "shuffle"  # the fixture's batches are shuffled slices: each divided by its own size
    return dp_sgd.ClientDP(cfg, 20)


def test_kd_mixed_step_without_noise_and_clip_is_plain_kd(kd):
    fw, teacher = kd
    start = models.get_tunable(fw.ctx.model)
    plain_metrics = fw.client_train(2, 0, teacher)
    plain = models.get_tunable(fw.ctx.model)
    models.set_tunable(fw.ctx.model, start)
    dp = kd_dp(math.inf, 0.0)
    private_metrics = fw.client_train(2, 0, teacher, dp=dp)
    private = models.get_tunable(fw.ctx.model)
    noised_dp = kd_dp(0.05, 1.0)
    models.set_tunable(fw.ctx.model, start)
    fw.client_train(2, 0, teacher, dp=noised_dp)
    noised = models.get_tunable(fw.ctx.model)
    models.set_tunable(fw.ctx.model, start)
    assert plain_metrics["client_kd_loss"] == pytest.approx(private_metrics["client_kd_loss"], rel=1e-4)
    assert any(not torch.equal(plain[k], start[k]) for k in plain)
    for k in plain:
        assert torch.allclose(private[k], plain[k], atol=1e-5, rtol=1e-4), k
    assert any(not torch.allclose(noised[k], plain[k], atol=1e-4) for k in plain)
    assert dp.accountant.steps == math.ceil(20 / 8) == noised_dp.accountant.steps  # one per private batch


def test_kd_mixed_step_clips_the_private_examples_and_adds_the_public_term(kd):
    """One step by hand in float64: (1 - lambda) x mean of clipped per-example CE gradients + lambda x
    the KD gradient of the public slice, unclipped."""
    fw, teacher = kd
    ctx, lam = fw.ctx, fw.cfg.kd.client_kd_weight
    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    step = fw.client_steps(2, 0, 0, distilling=True)[0]
    every, weight = torch.arange(len(ctx.data.public)), torch.ones(fw.rows)
    kd_term = lambda: lam * fw.public_kd_loss(model, step.public, every, teacher, weight)  # noqa: E731
    norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs if g is not None))  # noqa: E731
    raw = list(dp_sgd.example_grads(model, params, ctx.task.loss, step.private, []))
    public = torch.autograd.grad(kd_term(), params, allow_unused=True)
    clip = 0.5 * min([norm(g) for g in raw] + [norm(public)])  # every example, and the public term, over it
    clipped = [dp_sgd.clip_example(g, clip) for g in raw]
    assert len(clipped) == 8 and all(norm(c) <= clip * (1 + 1e-6) for c in clipped)
    dp = kd_dp(clip, 0.0)
    dp_sgd.private_step(model, params, ctx.task.loss, step.private, dp, kd_term, 1 - lam)
    for i, p in enumerate(params):
        mean = sum(c[i].double() for c in clipped if c[i] is not None) / len(clipped)
        expected = (1 - lam) * mean + (0 if public[i] is None else public[i].double())  # lambda is in kd_term
        assert torch.allclose(p.grad.double(), expected, atol=1e-6), i
    assert dp.accountant.steps == 1


def test_kd_under_dp_sgd_resumes_to_the_same_metrics(tmp_path):
    """The accountant and the noise of kd's mixed DP-SGD steps survive a kill and --resume."""
    a = assert_resume_matches(tmp_path, framework="kd", privacy__dp_sgd=True, fed__rounds=3, data__private_size=48,
                              data__public_size=16, data__test_size=16, kd__client_eval_size=0)
    last = [r for r in a if r["client"] == 0][-1]
    assert last["round"] == 3 and last["dp_steps"] == 3 and last["client_kd_loss"] > 0
