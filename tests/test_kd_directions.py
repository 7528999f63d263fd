"""KD's research directions (paper IV.B): public-set alignment, public-set pruning, low-rank
logits and clustered aggregation: the math by hand, exact bytes and FLOPs, resume and Flower."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import run_tiny, tiny_config
from test_frameworks import assert_resume_matches, strip

from fedtune import data as datalib
from fedtune.config import DataConfig, KDConfig
from fedtune.errors import FedtuneError
from fedtune.frameworks import get
from fedtune.frameworks.base import Context
from fedtune.frameworks.kd import alignment, codecs, decode_outputs, encode_outputs, entropy, refiners, selectors
from fedtune.wire import Message, serialize

SMALL = dict(framework="kd", data__public_size=40, data__test_size=50, kd__client_eval_size=20)


def framework(tmp_path, **kw):
    cfg = tiny_config(tmp_path, **{**SMALL, **kw})
    return get("kd")(Context.build(cfg))


# --------------------------------------------------------------------------- alignment


def test_align_weights_equal_a_hand_computation():
    # Clients hold labels 1:3; the public set 3:1. w = p_clients / p_public = (1/4)/(3/4), (3/4)/(1/4).
    w = alignment.align_weights(torch.tensor([1, 3]), [0, 0, 0, 1])
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 3.0])  # already averages 1
    # A label no client holds is left out; the kept rows are scaled to average 1.
    w = alignment.align_weights(torch.tensor([2, 0, 2]), [0, 1, 1, 2])  # raw 2, 0, 0, 2
    assert w.tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0])
    # The weighted public histogram is the clients' distribution.
    labels = [0, 0, 0, 1, 2, 2]
    w = alignment.align_weights(torch.tensor([5, 3, 2]), labels)
    weighted = torch.zeros(3, dtype=torch.float64).index_add_(0, torch.tensor(labels), w.double())
    assert (weighted / weighted.sum()).tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert alignment.label_histogram([2, 0, 2, 2], 4).tolist() == [1, 0, 3, 0]
    assert alignment.total_variation(torch.tensor([1, 3]), torch.tensor([3, 1])) == pytest.approx(0.5)


def test_align_clip_truncates_the_weights_and_renormalises_by_hand():
    # Clients hold labels 0, 1, 2 as 1:1:2; the public set 6:3:1 (ten rows).
    pooled, labels = torch.tensor([1, 1, 2]), [0] * 6 + [1] * 3 + [2]
    raw = [(1 / 4) / (6 / 10), (1 / 4) / (3 / 10), (2 / 4) / (1 / 10)]  # 5/12, 5/6, 5
    mean = (6 * raw[0] + 3 * raw[1] + raw[2]) / 10  # 1.0
    scaled = [r / mean for r in raw]
    assert alignment.align_weights(pooled, labels, 0.0).tolist() == pytest.approx([scaled[0]] * 6 + [scaled[1]] * 3
                                                                                  + [scaled[2]])
    cut = [min(x, 2.0) for x in scaled]  # only label 2's row is above 2 x the mean
    cut_mean = (6 * cut[0] + 3 * cut[1] + cut[2]) / 10
    w = alignment.align_weights(pooled, labels, 2.0)
    assert w.tolist() == pytest.approx([cut[0] / cut_mean] * 6 + [cut[1] / cut_mean] * 3 + [2.0 / cut_mean])
    assert float(w.double().mean()) == pytest.approx(1.0) and w.max() < scaled[2]
    # A clip above every weight changes nothing; rows of a label no client holds stay at 0.
    assert alignment.align_weights(pooled, labels, 10.0).tolist() == alignment.align_weights(pooled, labels).tolist()
    w = alignment.align_weights(torch.tensor([0, 1, 3]), labels, 1.5)  # raw 0, 10/12, 30/4 on 4 kept rows
    kept = [(1 / 4) / (3 / 10)] * 3 + [(3 / 4) / (1 / 10)]
    kept = [k / (sum(kept) / 4) for k in kept]
    kept = [min(k, 1.5) for k in kept]
    assert w.tolist() == pytest.approx([0.0] * 6 + [k / (sum(kept) / 4) for k in kept])


def test_public_skew_shifts_only_the_public_labels():
    base = dict(public_size=300, private_size=450, max_labels=15)
    flat = datalib.load(DataConfig(**base), clients=3, seed=0)
    skew = datalib.load(DataConfig(**base, public_skew=3.0), clients=3, seed=0)
    count = Counter(skew.public.labels)
    # weights exp(-3 y / 14): the first five intents are drawn far more often than the last five
    assert sum(count[y] for y in range(5)) > 3 * sum(count[y] for y in range(10, 15))
    flat_count = Counter(flat.public.labels)
    assert sum(flat_count[y] for y in range(5)) < 2 * sum(flat_count[y] for y in range(10, 15))
    assert not set(skew.public.texts) & set(sum((c.texts for c in skew.clients), []))
    assert sum(len(c) for c in skew.clients) == 450
    again = datalib.load(DataConfig(**base, public_skew=3.0), clients=3, seed=0)
    assert again.public.texts == skew.public.texts  # seeded


def test_align_uploads_the_histogram_and_weights_the_server_rows(tmp_path):
    cfg = tiny_config(tmp_path, **SMALL, kd__align=True, kd__align_clip=1.5, data__public_skew=4.0,
                      data__partition="dirichlet", data__dirichlet_alpha=0.5, fed__rounds=1)
    summary, rundir = run_tiny(cfg)
    fw = get("kd")(Context.build(cfg))
    records = rundir.metrics.records()
    server = records[-1]
    pooled = sum(alignment.label_histogram(c.labels, 4) for c in fw.ctx.data.clients)
    public = alignment.label_histogram(fw.ctx.data.public.labels, 4)
    assert server["kd_align_tv"] == pytest.approx(alignment.total_variation(pooled, public)) and server["kd_align_tv"] > 0.1
    # The server's weights are the clipped ones (the clip binds on this skew).
    examples = torch.arange(len(fw.ctx.data.public.labels))
    w = fw.align(examples, pooled, {})
    assert torch.equal(w, torch.repeat_interleave(alignment.align_weights(pooled, fw.ctx.data.public.labels, 1.5),
                                                  fw.row_count))
    assert w.max() < alignment.align_weights(pooled, fw.ctx.data.public.labels).max()
    for r in records[:-1]:  # the histogram travels in the metered upload
        hist = alignment.label_histogram(fw.ctx.data.clients[r["client"]].labels, 4)
        assert r["bytes_up"] == len(serialize(Message({"values": torch.zeros(40, 4), "label_hist": hist})))
    # A bad histogram rejects the upload, with the reason.
    good = encode_outputs(torch.randn(40, 4), cfg.kd)
    rec = fw.aggregate(1, {0: (Message({**good, "label_hist": torch.tensor([1, 2])}), {"num_samples": 1}),
                           1: (Message({**good, "label_hist": torch.tensor([1, 2, 3, 4], dtype=torch.int32)}),
                               {"num_samples": 1})})
    assert rec["rejected"] == {"0": "kd.align needs a label_hist of 4 non-negative integers"}


# --------------------------------------------------------------------------- pruning


def test_selection_is_random_first_then_by_score():
    first = selectors.select_examples(10, 4, None, seed=0, rnd=1)
    assert len(first) == 4 and first.tolist() == sorted(first.tolist())
    assert first.tolist() != selectors.select_examples(10, 4, None, seed=0, rnd=2).tolist()
    scores = torch.tensor([0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.0, 2.0, 0.4, 0.5], dtype=torch.float64)
    assert selectors.select_examples(10, 4, scores, 0, 3).tolist() == [1, 3, 5, 7]
    # Never scored = the mean of the scored (2.0 here): above 1.0, below 3.0.
    nan = torch.tensor([3.0, 1.0, float("nan"), 1.0], dtype=torch.float64)
    assert selectors.select_examples(4, 2, nan, 0, 3).tolist() == [0, 2]
    assert selectors.select_examples(10, 0, scores, 0, 3).tolist() == list(range(10))


def test_disagreement_is_the_jensen_shannon_divergence():
    a, b = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert selectors.disagreement([a, b]).tolist() == pytest.approx([math.log(2), 0.0])
    assert selectors.per_example(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([2, 1])).tolist() == [2.0, 5.0]


def test_public_per_round_sends_and_computes_only_the_selected_rows(tmp_path):
    m = 10
    cfg = tiny_config(tmp_path, **SMALL, kd__public_per_round=m)
    _, rundir = run_tiny(cfg)
    fw = get("kd")(Context.build(cfg))
    count = lambda b, train: fw.ctx.task.flops(fw.ctx.flops, b, train)  # noqa: E731
    ids = {rnd: fw.selection(rnd) for rnd in (1, 2)}
    assert ids[1].tolist() != ids[2].tolist()
    for r in [r for r in rundir.metrics.records() if r["client"] != "server"]:
        sel = ids[r["round"]]
        down = {"public_ids": sel.to(torch.int32)} | ({"values": torch.zeros(m, 4)} if r["round"] == 2 else {})
        assert r["bytes_up"] == len(serialize(Message({"values": torch.zeros(m, 4)})))
        assert r["bytes_down"] == len(serialize(Message(down)))
        assert r["kd_public_examples"] == m
        assert r["client_flops_public"] == sum(count(b, False) for b in fw.public_batches(sel, cfg.train.eval_batch_size))
        steps = fw.client_steps(r["round"], r["client"], 0, r["round"] > 1, sel)
        assert r["client_flops_kd"] == sum(count(s.public, True) for s in steps if s.public is not None)
        if r["round"] > 1:  # the client distils exactly the selected examples, each once
            assert sorted(sum((sel[s.public.index].tolist() for s in steps if s.public is not None), [])) == sel.tolist()


def test_entropy_and_disagreement_rank_the_next_rows(tmp_path):
    fw = framework(tmp_path, kd__public_per_round=5, kd__select="entropy")
    up = Message(encode_outputs(torch.randn(5, 4), fw.cfg.kd))
    fw.aggregate(1, {0: (up, {"num_samples": 1})})
    outputs, _ = fw.public_outputs()  # the new global model's
    h = entropy(F.softmax(outputs, -1))
    assert fw.scores.tolist() == pytest.approx(h.tolist())
    assert fw.selection(2).tolist() == sorted(h.topk(5).indices.tolist())
    fw = framework(tmp_path, kd__public_per_round=5, kd__select="disagreement")
    sel = fw.selection(1)
    a = torch.full((5, 4), -10.0)
    a[:, 0] = 10.0
    b = a.clone()
    b[2] = b[2].flip(0)  # the clients disagree on the third selected example only
    fw.aggregate(1, {0: (Message(encode_outputs(a, fw.cfg.kd)), {"num_samples": 1}),
                     1: (Message(encode_outputs(b, fw.cfg.kd)), {"num_samples": 1})})
    assert int(fw.scores.nan_to_num(-1).argmax()) == int(sel[2]) and fw.scores[sel].gt(0).sum() == 1
    assert torch.isnan(fw.scores).sum() == 35  # never sent, never scored
    assert int(sel[2]) in fw.selection(2).tolist()


# --------------------------------------------------------------------------- low-rank logits


def test_full_rank_code_equals_the_dense_outputs_and_error_falls_with_rank():
    torch.manual_seed(0)
    logits = torch.randn(30, 12) * 3 + torch.randn(30, 1) * 5  # row shifts cost no rank
    dense = decode_outputs(encode_outputs(logits, KDConfig()), KDConfig(), 30, 12)
    errors = []
    for k in (1, 4, 8, 11, 12):
        cfg = KDConfig(logit_rank=k)
        t = encode_outputs(logits, cfg)
        assert t["coef_values"].shape == (30, k) and t["basis_values"].shape == (k, 12)
        errors.append(codecs.lowrank_error(logits, t))
        assert len(serialize(Message(t))) < 30 * k * 4 + k * 12 * 4 + 200  # the serialized tensors
        if k >= 11:  # a centred row has 11 degrees of freedom: rank 11 is already exact
            assert errors[-1] < 1e-6
            assert torch.allclose(decode_outputs(t, cfg, 30, 12), dense, atol=1e-6)
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3
    # int8 codes: the error includes the quantisation.
    t8 = encode_outputs(logits, KDConfig(logit_rank=12, logit_dtype="int8"))
    assert 0 < codecs.lowrank_error(logits, t8) < 0.02
    with pytest.raises(FedtuneError, match=r"low-rank code has shapes \(30, 4\) and \(4, 12\), expected \(29, k\)"):
        decode_outputs(encode_outputs(logits, KDConfig(logit_rank=4)), KDConfig(logit_rank=4), 29, 12)


def test_logit_rank_run_reports_the_error_and_bytes(tmp_path):
    cfg = tiny_config(tmp_path, **SMALL, kd__logit_rank=2)
    _, rundir = run_tiny(cfg)
    records = rundir.metrics.records()
    for r in [r for r in records if r["client"] != "server"]:
        code = {"coef_values": torch.zeros(40, 2), "basis_values": torch.zeros(2, 4)}
        assert r["bytes_up"] == len(serialize(Message(code)))
        assert 0 < r["logit_rank_error"] < 1
    assert 0 < records[-1]["server_logit_rank_error"] < 1


# --------------------------------------------------------------------------- clustered aggregation


def test_clusters_group_identical_clients_and_count_each_cluster_once(tmp_path):
    a = F.softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), -1)
    b = F.softmax(torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]]), -1)
    c = a + 0.01 * (b - a)  # almost a
    assert refiners.cluster_clients([b, a, a, c], 2) == [0, 1, 1, 1]
    teacher, assign = refiners.cluster_refine([a, a, b], 2)
    assert assign == [0, 0, 1]
    assert torch.allclose(teacher, (a + b) / 2)  # not (2a + b) / 3
    assert refiners.cluster_refine([a, b], 2)[1] == [0, 1]
    fw = framework(tmp_path, kd__aggregation="cluster", kd__clusters=2)
    x, y = torch.randn(40, 4) * 3, torch.randn(40, 4) * 3
    up = lambda z: (Message(encode_outputs(z, fw.cfg.kd)), {"num_samples": 1})  # noqa: E731
    record = fw.aggregate(1, {0: up(x), 1: up(y), 2: up(x)})
    assert record["kd_clusters"] == {"0": 0, "1": 1, "2": 0}


# --------------------------------------------------------------------------- resume, Flower, errors

ALL_ON = dict(kd__align=True, kd__align_clip=1.5, data__public_skew=2.0, kd__public_per_round=15, kd__logit_rank=2,
              kd__aggregation="cluster", kd__clusters=2)


def test_directions_resume_to_the_same_metrics(tmp_path):
    """The server's scores (which rows round 3 sends) and its encoded knowledge are checkpointed."""
    records = assert_resume_matches(tmp_path, fed__rounds=3, **SMALL, **ALL_ON, kd__select="disagreement")
    assert all("kd_clusters" in r for r in records if r["client"] == "server")


@pytest.mark.slow
def test_directions_on_flower_simulation_equal_inprocess(tmp_path):
    _, ref = run_tiny(tiny_config(tmp_path / "a", **SMALL, **ALL_ON, kd__select="disagreement"))
    _, sim = run_tiny(tiny_config(tmp_path / "b", **SMALL, **ALL_ON, kd__select="disagreement", runtime="flower-sim"))
    drop = {"runtime", "message_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in strip(ref.metrics.records())] == \
        [{k: v for k, v in r.items() if k not in drop} for r in strip(sim.metrics.records())]


@pytest.mark.parametrize("key, value, message", [
    ("kd.public_per_round", -1, r"kd.public_per_round must be in \[0, data.public_size=40\] \(0 = all\); got -1"),
    ("kd.public_per_round", 41, r"kd.public_per_round must be in \[0, data.public_size=40\] \(0 = all\); got 41"),
    ("kd.select", "loss", r"kd.select must be one of random, entropy, disagreement; got 'loss'"),
    ("kd.select", "entropy", r"kd.select=entropy chooses among public rows: it needs kd.public_per_round > 0"),
    ("kd.logit_rank", -2, r"kd.logit_rank must be >= 0 \(0 = off\); got -2"),
    ("kd.clusters", 0, r"kd.clusters must be in \[1, fed.clients=3\]; got 0"),
    ("kd.aggregation", "clusters", r"kd.aggregation must be one of mean, weighted, entropy, cluster; got 'clusters'"),
    ("data.public_skew", -1.0, r"data.public_skew must be a finite number >= 0 \(0 = no shift\); got -1.0"),
    ("kd.align_clip", -1.0, r"kd.align_clip must be a finite number >= 0 \(times the mean weight; 0 = no clipping\); "
                            r"got -1.0"),
    ("kd.align_clip", float("inf"), r"kd.align_clip must be a finite number >= 0 \(times the mean weight; 0 = no "
                                    r"clipping\); got inf"),
])
def test_bad_values_are_one_line_errors(tmp_path, key, value, message):
    with pytest.raises(FedtuneError, match=f"^{message}$"):
        tiny_config(tmp_path, **SMALL, **{key.replace(".", "__"): value})


def test_bad_combinations_are_one_line_errors(tmp_path):
    with pytest.raises(FedtuneError, match=r"^kd.logit_rank=2 codes the dense logits; it does not combine with "
                                           r"kd.logit_topk=3 \(set one of them to 0\)$"):
        tiny_config(tmp_path, **SMALL, kd__logit_rank=2, kd__logit_topk=3)
    with pytest.raises(FedtuneError, match=r"^kd.clusters must be in \[1, fed.clients=3\]; got 4$"):
        tiny_config(tmp_path, **SMALL, kd__aggregation="cluster", kd__clusters=4)
    tiny_config(tmp_path, **SMALL, kd__clusters=4)  # the default aggregation ignores kd.clusters
    with pytest.raises(FedtuneError, match=r"^kd.align works on labelled rows .*got train.task=sft$"):
        tiny_config(tmp_path, **SMALL, kd__align=True, train__task="sft")
    with pytest.raises(FedtuneError, match=r"^kd.align_clip=5.0 clips kd.align's weights: it needs kd.align = true$"):
        tiny_config(tmp_path, **SMALL, kd__align_clip=5.0)
    tiny_config(tmp_path, **SMALL, kd__align_clip=0.0, kd__align=True)  # 0 = the raw weights

