"""PEFT methods, FFA-LoRA, rsLoRA, heterogeneous and dynamic LoRA ranks (docs/peft.md)."""

from __future__ import annotations

import pytest
import torch

from fedtune import models
from fedtune.config import ModelConfig
from fedtune.errors import FedtuneError
from fedtune.frameworks.split.cut import CutModel

from conftest import run_tiny, tiny_config


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_split_prompt_tuning_computes_what_peft_computes(name):
    model, _ = models.build(ModelConfig(name=name, peft="prompt", virtual_tokens=4), 5, seed=0)
    model.eval()
    ids = torch.randint(3, 1000, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        cut = CutModel(model, 1)
        packed = cut.client_forward(ids, mask)
        assert packed.shape[0] == 3 * (9 + 4)  # the prompt's tokens cross the cut
        split = cut.server_forward(packed, cut.full_mask(mask))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert any(p is cut.prompt.embedding.weight for p in cut.client.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- strategies on small tensors

from fedtune.adapters import lora_state as lora  # noqa: E402
from fedtune.strategies.flexlora import FlexLoRA  # noqa: E402
from fedtune.strategies.flora import FLoRA  # noqa: E402
from fedtune.strategies.hetlora import HetLoRA  # noqa: E402

A, B, HEAD = "m.lora_A.default.weight", "m.lora_B.default.weight", "score.modules_to_save.default.weight"


def client_state(r, seed, out=6, inp=5):
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(r, inp, generator=g, dtype=torch.float64),
            B: torch.randn(out, r, generator=g, dtype=torch.float64),
            HEAD: torch.randn(3, out, generator=g, dtype=torch.float64)}


UPDATES = [(client_state(1, 1), 10.0), (client_state(2, 2), 30.0), (client_state(4, 3), 20.0)]
CURRENT = client_state(4, 0)


def mean_product(updates):
    total = sum(w for _, w in updates)
    return sum(s[B] @ s[A] * (w / total) for s, w in updates)


def test_flexlora_mean_is_the_mean_of_products_and_truncation_error_is_the_discarded_singular_values():
    mean = mean_product(UPDATES)
    sigma = torch.linalg.svdvals(mean)
    assert (sigma > 1e-9).sum() == 5  # rank 1 + 2 + 4 products, 5 x 6: full rank 5, so r_max = 4 truncates
    out = FlexLoRA().aggregate(CURRENT, UPDATES)
    for r in (1, 2, 4):
        mine = FlexLoRA().for_client(out, r)
        assert mine[A].shape == (r, 5) and mine[B].shape == (6, r)
        err = torch.linalg.matrix_norm(mean - mine[B] @ mine[A])
        torch.testing.assert_close(err**2, (sigma[r:] ** 2).sum(), rtol=1e-9, atol=1e-12)
    # the global adapter's product is the rank-4 truncation of the exact mean
    u, s, vh = torch.linalg.svd(mean)
    torch.testing.assert_close(out[B] @ out[A], (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out[HEAD], sum(s[HEAD] * w for s, w in UPDATES) / 60.0)


def test_flora_stacked_product_is_the_weighted_mean_of_products():
    out = FLoRA(tiny_config()).aggregate(CURRENT, UPDATES)
    assert out[A].shape == (1 + 2 + 4, 5)  # stacked: rank sum r_i
    torch.testing.assert_close(out[B] @ out[A], mean_product(UPDATES), rtol=1e-12, atol=1e-12)
    assert lora.aggregation_error(UPDATES, out) < 1e-12
    assert lora.aggregation_error(UPDATES) > 0.1  # averaging the (zero-padded) factors is not exact


def test_hetlora_pads_weighs_by_norm_and_returns_each_client_its_rank():
    strategy = HetLoRA()
    out = strategy.aggregate(CURRENT, UPDATES)
    assert out[A].shape == (4, 5)
    norms = [torch.linalg.matrix_norm(s[B] @ s[A]).item() for s, _ in UPDATES]
    weights = [w * n for (_, w), n in zip(UPDATES, norms)]
    expect = sum(lora.resize(s, 4)[A] * w for (s, _), w in zip(UPDATES, weights)) / sum(weights)
    torch.testing.assert_close(out[A], expect)
    for r in (1, 2, 4):
        mine = strategy.for_client(out, r)
        assert mine[A].shape == (r, 5) and mine[B].shape == (6, r)
        torch.testing.assert_close(mine[A], out[A][:r])


def test_aggregation_error_is_the_relative_error_of_factor_averaging():
    ups = [(client_state(2, 5), 1.0), (client_state(2, 6), 3.0)]
    ma = (ups[0][0][A] + 3 * ups[1][0][A]) / 4
    mb = (ups[0][0][B] + 3 * ups[1][0][B]) / 4
    p = mean_product(ups)
    expect = torch.linalg.matrix_norm(mb @ ma - p) / torch.linalg.matrix_norm(p)
    assert lora.aggregation_error(ups) == pytest.approx(float(expect), rel=1e-12)
    same_a = [({**s, A: ups[0][0][A]}, w) for s, w in ups]  # FFA-LoRA: one shared A: exact
    assert lora.aggregation_error(same_a) < 1e-12


def test_resize_grows_without_changing_the_product():
    s = client_state(2, 7)
    grown = lora.resize(s, 5, seed=0, std=0.5)
    assert grown[A].shape == (5, 5) and grown[A][2:].abs().sum() > 0 and grown[B][:, 2:].abs().sum() == 0
    torch.testing.assert_close(grown[B] @ grown[A], s[B] @ s[A])


# --------------------------------------------------------------------------- whole runs


def server_records(rundir):
    return [r for r in rundir.metrics.records() if r["client"] == "server"]


def client_records(rundir):
    return [r for r in rundir.metrics.records() if r["client"] != "server"]


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "flora"])
def test_heterogeneous_ranks_run_and_bytes_follow_each_clients_rank(tiny, strategy):
    cfg = tiny(**{"model.client_ranks": [1, 2, 4], "fed.strategy": strategy})
    summary, rundir = run_tiny(cfg)
    assert summary["final_test_accuracy"] > 0.25  # learns on 4 labels (chance 25%)
    up = {r["client"]: r["bytes_up"] for r in client_records(rundir) if r["round"] == 2}
    # each client uploads its own rank: the LoRA part grows with r (c_attn: 64 in, 192 out)
    lora_bytes_per_rank = 2 * (64 + 192) * 4  # two blocks, A row + B column, fp32
    assert up[1] - up[0] == pytest.approx(1 * lora_bytes_per_rank, abs=64)
    assert up[2] - up[1] == pytest.approx(2 * lora_bytes_per_rank, abs=64)
    server = server_records(rundir)
    assert all("aggregation_error" in r and "aggregation_error_global" in r for r in server)
    if strategy == "flora":
        assert max(r["aggregation_error_global"] for r in server) < 1e-5
        down = {r["client"]: r["bytes_down"] for r in client_records(rundir) if r["round"] == 2}
        assert down[0] > up[0] + 6 * lora_bytes_per_rank  # the stacked rank-7 adapter goes down


def test_fedavg_reports_aggregation_error_and_ffa_lora_makes_it_exact(tiny):
    _, rundir = run_tiny(tiny())
    assert all(r["aggregation_error"] > 0 for r in server_records(rundir))
    cfg = tiny(**{"model.lora_freeze_a": True, "out": str(rundir.path) + "-ffa"})
    _, ffa = run_tiny(cfg)
    assert all(r["aggregation_error"] < 1e-6 for r in server_records(ffa))
    # only B travels: the A half of the LoRA bytes (2 blocks x r=8 x 64 inputs, fp32) is gone
    full_up = client_records(rundir)[0]["bytes_up"]
    ffa_up = client_records(ffa)[0]["bytes_up"]
    assert full_up - ffa_up == pytest.approx(2 * 8 * 64 * 4, abs=256)


def test_rank_switch_leaves_logits_unchanged_and_bytes_follow_the_rank(tiny):
    cfg = tiny(**{"model.rank_schedule": "{1 = 2, 2 = 4}", "fed.rounds": 2})
    from fedtune.frameworks import get as framework_class
    from fedtune.frameworks.base import Context

    fw = framework_class(cfg.framework)(Context.build(cfg))
    before = fw.configure(1, 0).tensors
    batch = fw.ctx.test_batches(limit=8)[0]
    model = fw.global_model()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        after = fw.configure(2, 0).tensors  # round 2 switches to rank 4
        assert lora.rank(before) == 2 and lora.rank(after) == 4
        logits2 = fw.global_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-6)
    _, rundir = run_tiny(cfg)
    up = {r["round"]: r["bytes_up"] for r in client_records(rundir) if r["client"] == 0}
    assert up[2] - up[1] == pytest.approx(2 * 2 * (64 + 192) * 4, abs=64)


@pytest.mark.parametrize("keys", [
    {"model.peft": "dora"},
    {"model.lora_scaling": "rslora", "model.lora_freeze_a": True},
    {"model.client_ranks": [1, 2, 4], "fed.strategy": "flora"},
    {"model.rank_schedule": "{1 = 1, 2 = 2, 3 = 4}"},
    {"framework": "kd", "model.client_ranks": [1, 2, 4], "kd.client_eval_size": 50},
], ids=["dora", "rslora-ffa", "flora", "schedule", "kd-ranks"])
def test_new_keys_resume_to_the_same_metrics(tmp_path, keys):
    from test_frameworks import assert_resume_matches

    assert_resume_matches(tmp_path, kill_round=3, **{"fed.rounds": 3, **keys})  # killed mid-round 3


@pytest.mark.parametrize("keys, message", [
    ({"model.client_ranks": [2, 4]}, "one rank per client"),
    ({"framework": "split", "model.peft": "prefix"}, "does not fit split"),
    ({"model.peft": "adapter"}, "model.peft must be one of"),
    ({"model.client_ranks": [2, 4, 8]}, "need fed.strategy"),
    ({"model.rank_schedule": "{1 = 4, 3 = 2}"}, "never lower the rank"),
    ({"model.peft": "ia3", "model.lora_freeze_a": True}, "lora_freeze_a applies"),
    ({"fed.strategy": "flora", "fed.fraction": 0.5}, "needs fed.fraction=1"),
])
def test_bad_combinations_are_one_line_errors(keys, message):
    with pytest.raises(FedtuneError) as err:
        tiny_config(**keys)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_kd_clients_train_their_own_rank(tiny):
    """Under kd nothing is aggregated: model.client_ranks is each client's local rank."""
    from fedtune.frameworks import get as framework_class
    from fedtune.frameworks.base import Context

    cfg = tiny(**{"framework": "kd", "model.client_ranks": [1, 2, 4], "kd.client_eval_size": 0})
    fw = framework_class("kd")(Context.build(cfg))
    assert lora.rank(fw.global_state) == 8 == cfg.model.lora_r  # the server's own rank
    for cid, r in enumerate([1, 2, 4]):
        state = None
        for rnd in (1, 2):  # round 2 starts from the kept rank-r state
            state = fw.fit(rnd, cid, fw.configure(rnd, cid), state, None).state
            assert lora.rank(state["tunable"]) == r
            # the shared rank-8 model after this client's pass: a trained rank-r adapter, the rest zero
            trained = models.get_tunable(fw.ctx.model)
            for a_key, b_key in lora.pairs(trained).values():
                a, b = trained[a_key], trained[b_key]
                assert a[r:].abs().sum() == 0 and b[:, r:].abs().sum() == 0 and b[:, :r].abs().sum() > 0
    with pytest.raises(FedtuneError, match="framework=fedavg or kd") as err:
        tiny_config(**{"framework": "split", "model.client_ranks": [1, 2, 4]})
    assert "\n" not in str(err.value)
