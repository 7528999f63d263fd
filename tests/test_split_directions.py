"""Split learning's research directions (docs/split.md, "Research directions"): a cut per client
(split.client_layers), resource-aware cuts (split.auto), an activation traffic budget
(split.act_budget_mb) and loss-ranked sampling (split.sample = loss)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import run_tiny, tiny_config
from test_frameworks import assert_resume_matches, strip

from fedtune import models
from fedtune.frameworks.split import codecs
from fedtune.frameworks.split import plan as split_plan
from fedtune.errors import FedtuneError
from fedtune.frameworks.base import Context
from fedtune.frameworks.split import SplitFramework
from fedtune.metering import FlopModel
from fedtune.metrics import MB
from fedtune.runtimes.rounds import MeteredLink
from fedtune.wire import Message, deserialize, serialize


@pytest.fixture
def deep(monkeypatch):
    """The tiny GPT-2 with 3 blocks, so that clients can hold 1 or 2 of them."""
    monkeypatch.setitem(models.TINY, "tiny-gpt2", {**models.TINY["tiny-gpt2"], "n_layer": 3})


def records(rundir, who=None):
    rs = rundir.metrics.records()
    return [r for r in rs if who is None or (r["client"] == "server") == (who == "server")]


# ---------------------------------------------------------------- a cut per client


def test_equal_cuts_equal_todays_split(tmp_path):
    ref, ref_dir = run_tiny(tiny_config(tmp_path / "a", framework="split", split__split_layer=1))
    cut, cut_dir = run_tiny(tiny_config(tmp_path / "b", framework="split", split__client_layers=[1, 1, 1]))
    assert cut["final_test_accuracy"] == ref["final_test_accuracy"]
    assert strip(cut_dir.metrics.records()) == strip(ref_dir.metrics.records())  # bytes included
    assert all(r["split_layer"] == 1 for r in records(cut_dir, "client"))


def test_each_client_keeps_its_blocks_and_the_server_serves_every_cut(tmp_path, deep):
    summary, rundir = run_tiny(tiny_config(tmp_path, framework="split", split__client_layers=[1, 2, 1], fed__rounds=3))
    assert summary["final_test_accuracy"] > 0.4  # chance 0.25
    clients = records(rundir, "client")
    assert [r["split_layer"] for r in clients[:3]] == [1, 2, 1]
    one, two = clients[0], clients[1]
    # A second block costs the client FLOPs and doubles its adapter (per sample: shards differ in length).
    assert 1.5 < (two["client_flops"] / two["num_samples"]) / (one["client_flops"] / one["num_samples"]) < 3
    assert two["adapter_bytes_up"] > 1.8 * one["adapter_bytes_up"]
    assert all(s["client_layers"] == [1, 2, 1] for s in records(rundir, "server"))


def test_shared_block_is_averaged_with_the_server_copy(tmp_path, deep):
    """Block 1 is held by client 1 (cut 2) and run by the server for clients 0 and 2 (cut 1):
    its tensors become the samples-weighted mean of client 1's upload and the server's copy,
    in float64; block 0's the mean over all three; the copy restarts from the mean."""
    cfg = tiny_config(tmp_path, framework="split", split__client_layers=[1, 2, 1])
    fw = SplitFramework(Context.build(cfg))
    block0 = [k for k in fw.global_state if k.startswith("3.")]  # GPT-2: wte, wpe, drop, then blocks
    block1 = sorted(fw.copy_keys)
    assert block0 and block1 and all(k.startswith("4.") for k in block1)
    assert set(fw.global_state) == set(block0) | set(block1)
    gen = torch.Generator().manual_seed(0)
    rand = lambda keys: {k: torch.randn(fw.global_state[k].shape, generator=gen) for k in keys}  # noqa: E731
    ups = {0: rand(block0), 1: rand(block0 + block1), 2: rand(block0)}
    samples = {0: 30, 1: 50, 2: 20}
    server = rand(block1)
    with torch.no_grad():
        for k, p in fw.mirror.named_parameters():
            if k in server:
                p.copy_(server[k])
    fw.aggregate(1, {c: (Message(ups[c]), {"num_samples": samples[c]}) for c in ups})
    for k in block0:
        want = sum(ups[c][k].double() * samples[c] for c in ups) / 100
        assert torch.equal(fw.global_state[k], want.float())
    for k in block1:
        want = (ups[1][k].double() * 50 + server[k].double() * (30 + 20)) / 100
        assert torch.equal(fw.global_state[k], want.float())
    copies = dict(fw.mirror.named_parameters())
    assert all(torch.equal(copies[k], fw.global_state[k]) for k in block1)
    # Each client is sent the tensors of the blocks it holds.
    assert set(fw.configure(2, 0).tensors) == set(block0)
    assert set(fw.configure(2, 1).tensors) == set(block0) | set(block1)


def test_per_client_cuts_directions_resume(tmp_path, deep):
    # The server's copies and optimizer, and each client's loss table, go through the checkpoint.
    assert_resume_matches(tmp_path, framework="split", split__client_layers=[1, 2, 1], split__sample="loss",
                          split__samples_per_round=40, split__act_budget_mb=0.04, fed__rounds=3)


def test_per_client_cuts_flower_simulation_equals_inprocess(tmp_path, deep):
    kw = dict(framework="split", split__client_layers=[2, 1, 2], split__sample="loss", split__samples_per_round=40,
              split__act_budget_mb=0.04)
    ref, ref_dir = run_tiny(tiny_config(tmp_path / "a", **kw))
    sim, sim_dir = run_tiny(tiny_config(tmp_path / "b", runtime="flower-sim", **kw))
    assert abs(sim["final_test_accuracy"] - ref["final_test_accuracy"]) <= 1e-6
    drop = {"runtime"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in strip(sim_dir.metrics.records())] == \
           [{k: v for k, v in r.items() if k not in drop} for r in strip(ref_dir.metrics.records())]


# ---------------------------------------------------------------- resource-aware cuts


def _toy_workload(**kw) -> split_plan.Workload:
    # 4 blocks, each one 8x8 frozen product; an 8->4 trainable head outside the blocks.
    flops = FlopModel(matmuls=tuple((b, False, 8, 8, False, False) for b in range(4)) + ((-1, False, 8, 4, True, False),),
                      blocks=4, attn_width=8, first_trainable_block=0)
    values = dict(flops=flops, batch=2, length=3, batches=10, hidden=8, heads=2, value_bytes=4, base_params=100,
                  block_params=(50, 50, 50, 50), adapter_bytes=(0, 1000, 2000, 3000))
    values.update(kw)
    return split_plan.Workload(**values)


def _by_hand(c: int, flops_per_s: float, mbps: float, server: float) -> tuple[float, float]:
    """(latency s, memory MB) of cut c in _toy_workload, from the cost model's formulas."""
    tokens = 6
    block = 2 * (2 * tokens * 8 * 8) + 3 * (4 * 2 * 3 * 3 * 8)  # matmul + input grad; attention fwd + bwd
    head = 3 * (2 * tokens * 8 * 4)  # forward, input grad, weight grad
    client = 10 * block * c / flops_per_s
    serve = 10 * (block * (4 - c) + head) / server
    transfer = (10 * 2 * tokens * 8 * 4 + 2 * 1000 * c) * 8 / (mbps * 1e6)
    memory = 4 * (100 + 50 * c) + c * 2 * tokens * 8 * (34 + 5 * 2 * 3 / 8)
    return client + transfer + serve, memory / 2**20


def test_cost_model_picks_the_hand_computed_cut():
    w = _toy_workload()
    server = 1e5
    for flops_per_s, mbps, want in ((1e4, 1.0, 1), (1e7, 1000.0, 3), (1e7, 0.001, 1)):
        # a slow client keeps 1 block; a fast one with a fast link 3; with a slow link the adapter's
        # bytes (which grow with the cut) outweigh the server's time
        p = split_plan.Profile(flops_per_s, 1e6, mbps)
        options = split_plan.costs(w, p, server)
        assert [o.cut for o in options] == [1, 2, 3]
        for o in options:
            latency, memory = _by_hand(o.cut, flops_per_s, mbps, server)
            assert o.latency_s == pytest.approx(latency, rel=1e-12)
            assert o.memory_mb == pytest.approx(memory, rel=1e-12)
        assert split_plan.choose(options, p, 0).cut == want


def test_cost_model_respects_memory():
    w = _toy_workload()
    room = _by_hand(2, 1, 1, 1)[1]  # exactly what cut 2 needs
    p = split_plan.Profile(1e7, room, 1000.0)  # fast: it would take 3 blocks
    chosen = split_plan.choose(split_plan.costs(w, p, 1e5), p, 0)
    assert chosen.cut == 2 and chosen.memory_mb <= room
    tight = split_plan.Profile(1e7, _by_hand(1, 1, 1, 1)[1] * 0.99, 1000.0)
    with pytest.raises(FedtuneError, match=r"split.client_profiles\[4\]: memory_mb=.* fits no cut \(cut 1 needs"):
        split_plan.choose(split_plan.costs(w, tight, 1e5), tight, 4)


def test_auto_cuts_are_logged_in_the_records(tmp_path, deep, caplog):
    profiles = [[1e6, 1e4, 10.0], [1e15, 1e4, 1e4], [1e15, 1e4, 1e4]]
    cfg = tiny_config(tmp_path, framework="split", split__auto=True, split__client_profiles=profiles,
                      split__server_flops_per_s=1e9, fed__rounds=1)
    log = logging.getLogger("fedtune")  # the CLI stops it propagating to the root (cli._own_log_lines)
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="fedtune")
    try:
        summary, rundir = run_tiny(cfg)
    finally:
        log.removeHandler(caplog.handler)
    fw = SplitFramework(Context.build(cfg))
    assert fw.cuts == [1, 2, 2]  # slow client: 1 block; fast clients: both blocks the model allows
    server = records(rundir, "server")[0]
    assert server["client_layers"] == [1, 2, 2]
    assert server["modelled_round_latency_s"] == max(server["modelled_latency_s"]) > 0
    clients = records(rundir, "client")
    assert [r["split_layer"] for r in clients] == [1, 2, 2]
    assert [r["modelled_latency_s"] for r in clients] == server["modelled_latency_s"]
    assert "split.auto: round latency" in caplog.text


# ---------------------------------------------------------------- activation budget


def test_tiers_give_precision_to_the_largest_norm_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(10, 32, generator=gen), dim=-1) * torch.arange(1, 11).float()[:, None]  # norm i+1
    t = codecs.Tiers(2).encode(x, "act.")  # half the tokens fp16, half int8
    assert t["act.tiers"].tolist() == [10, 32, 0, 5, 5, 0]
    assert t["act.order"].tolist() == list(range(9, -1, -1))
    assert t["act.f16.values"].dtype == torch.float16 and t["act.i8.values"].dtype == torch.int8
    back = codecs.decode(t, "act.")
    assert torch.allclose(back[5:], x[5:], atol=0, rtol=1e-3)  # fp16
    assert not torch.allclose(back[:5], x[:5], atol=0, rtol=1e-3)  # int8
    assert (back[:5] - x[:5]).abs().max() <= x[:5].abs().max() / 127
    # The last rung: 5% int8, 20% sparse int8, the rest (the lowest-norm tokens) not sent.
    t = codecs.Tiers(len(codecs.RUNGS) - 1).encode(x, "act.")
    assert t["act.tiers"].tolist() == [10, 32, 0, 0, 1, 2]
    back = codecs.decode(t, "act.")
    assert back[:7].abs().sum() == 0 and back[9].abs().sum() > 0
    # The gradient comes back in the same layout: nothing for dropped tokens, the kept entries of sparse ones.
    g = torch.randn(10, 32, generator=gen)
    gb = codecs.decode(codecs.encode_like(g, t, "act.", "grad."), "grad.", t, "act.")
    assert gb[:7].abs().sum() == 0
    assert torch.count_nonzero(gb[7:9]) == 2 * math.ceil(0.05 * 32)
    tally = {}
    codecs.tally(tally, t, "act.", 10)
    assert tally == {"act_tokens_fp32": 0, "act_tokens_fp16": 0, "act_tokens_int8": 1, "act_tokens_sparse": 2,
                     "act_tokens_dropped": 7}


def test_round_upload_stays_within_the_budget(tmp_path):
    budget = 0.03  # MB per client per round; dense fp32 sends ~0.22
    summary, rundir = run_tiny(tiny_config(tmp_path, framework="split", split__split_layer=1,
                                           split__act_budget_mb=budget))
    for r in records(rundir, "client"):
        assert r["bytes_up_link"] <= budget * MB  # every activation message, as serialized
        assert r["bytes_up_link"] > 0.8 * budget * MB  # and the budget is used
        assert r["act_over_budget_batches"] == 0
        assert r["act_tokens_fp32"] == 0 and r["act_tokens_int8"] + r["act_tokens_sparse"] > 0
    assert summary["final_test_accuracy"] > 0.3


def test_generous_budget_is_dense_fp32(tmp_path):
    ref, ref_dir = run_tiny(tiny_config(tmp_path / "a", framework="split", split__split_layer=1))
    big, big_dir = run_tiny(tiny_config(tmp_path / "b", framework="split", split__split_layer=1,
                                        split__act_budget_mb=100.0))
    assert big["final_test_accuracy"] == ref["final_test_accuracy"]
    chosen = [r for r in big_dir.metrics.records() if r["client"] != "server"]
    assert all(r["act_tokens_fp32"] > 0 and r["act_tokens_fp16"] == r["act_tokens_dropped"] == 0 for r in chosen)
    plain = [{k: v for k, v in r.items() if not k.startswith("act_")} for r in strip(big_dir.metrics.records())]
    assert plain == strip(ref_dir.metrics.records())


# ---------------------------------------------------------------- loss-ranked sampling


class Direct:
    """One client's rounds against the server in this process."""

    def __init__(self, tmp_path, **kw):
        cfg = tiny_config(tmp_path, framework="split", split__split_layer=1, **kw)
        self.fw = SplitFramework(Context.build(cfg))
        self.sent: list[list[int]] = []  # the rows of each batch, by their labels message

    def round(self, rnd, state, cid=0):
        fw = self.fw

        def transport(blob):
            return serialize(fw.serve(rnd, cid, deserialize(blob)))

        return fw.fit(rnd, cid, fw.configure(rnd, cid), state, MeteredLink(transport))


def test_loss_sampling_sends_the_highest_loss_rows_first(tmp_path):
    d = Direct(tmp_path, split__sample="loss", split__samples_per_round=40)
    n = len(d.fw.ctx.data.clients[0])
    first = d.round(1, None)
    scores = first.state["split_loss"]
    sent = ~scores.isnan()
    assert sent.sum() == 40 == first.metrics["num_samples"]  # unscored rows never sent stay NaN
    # The losses are the server's per-row cross-entropy: they average to the batches' loss.
    assert scores[sent].mean().item() == pytest.approx(first.metrics["train_loss"], abs=0.05)
    # Round 2: the rows never sent come first (40 of the 60 left), none of round 1's.
    second = d.round(2, first.state)
    now = ~second.state["split_loss"].isnan()
    assert now.sum() == 80 and (now & ~sent).sum() == 40
    # With every row scored, a round takes the highest losses, batched in falling order.
    scores = torch.linspace(0, 1, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    batches = d.fw.loss_batches(3, 0, 0, scores)
    rows = torch.cat([b.index for b in batches])
    assert rows.tolist() == scores.argsort(descending=True)[:40].tolist()
    # Unscored rows first, in the seeded shuffle's order; then the scored ones by loss.
    scores[:5] = math.nan
    rows = torch.cat([b.index for b in d.fw.loss_batches(3, 0, 0, scores)])
    assert sorted(rows[:5].tolist()) == list(range(5)) and rows[5:].tolist() == \
           scores.nan_to_num(-1).argsort(descending=True)[:35].tolist()


def test_random_sampling_sends_no_losses(tmp_path):
    d = Direct(tmp_path, split__samples_per_round=40)
    result = d.round(1, None)
    assert result.state is None  # nothing kept: today's split


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, message", [
    (dict(split__client_layers=[1, 1]), r"split.client_layers needs one cut per client \(fed.clients=3\); got 2"),
    (dict(split__client_layers=[1, 0, 1]), r"split.client_layers must be cuts >= 1"),
    (dict(split__client_layers=[1, 1, 1], split__auto=True, split__client_profiles=[[1, 1, 1]] * 3),
     "set split.client_layers or split.auto=true, not both"),
    (dict(split__client_profiles=[[1, 1, 1]] * 3), "split.client_profiles is read by split.auto=true only"),
    (dict(split__auto=True), r"split.auto=true needs split.client_profiles: one \[flops_per_s"),
    (dict(split__auto=True, split__client_profiles=[[1, 1, 1], [1, 1], [1, 1, 1]]),
     r"split.client_profiles\[1\] must be \[flops_per_s, memory_mb, bandwidth_mbps\]"),
    (dict(split__auto=True, split__client_profiles=[[1, 1, 1], [1, 1, 1], [1, -1, 1]]),
     r"split.client_profiles\[2\] must be"),
    (dict(split__server_flops_per_s=0), "split.server_flops_per_s must be a finite number > 0; got 0"),
    (dict(split__act_budget_mb=-1), "split.act_budget_mb must be >= 0"),
    (dict(split__act_budget_mb=1, split__act_dtype="int8"), "split.act_budget_mb chooses the precision"),
    (dict(split__sample="hard"), "split.sample must be one of random, loss; got 'hard'"),
    (dict(split__sample="loss", train__task="generate"), "split.sample=loss ranks rows by their classification loss"),
    (dict(framework="split", split__client_layers=[1, 2, 1], fed__strategy="fedadam"),
     "clients with different cuts .* fed.strategy=fedadam does not combine"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(FedtuneError, match=message) as err:
        tiny_config(**overrides)
    assert "\n" not in str(err.value)


def test_cut_beyond_the_model_is_an_error(tmp_path):
    cfg = tiny_config(tmp_path, framework="split", split__client_layers=[1, 2, 1])
    with pytest.raises(FedtuneError, match=r"split.client_layers must be cuts in 1..1 for this 2-block model; got \[1, 2, 1\]"):
        SplitFramework(Context.build(cfg))


def test_report_groups_runs_by_list_of_list_keys():
    from fedtune.report.load import _hashable

    # split.client_profiles is a list of lists: a report cell's key must hash it
    assert hash(_hashable([[2e9, 2000.0, 10.0], [4e13, 100.0, 100.0]])) == hash(((2e9, 2000.0, 10.0), (4e13, 100.0, 100.0)))
