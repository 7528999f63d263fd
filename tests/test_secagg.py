"""privacy.secagg: Flower's SecAgg+ on flower-sim. The server's sum equals the plaintext FedAvg
of the very uploads the clients made, within SecAgg+'s quantisation error, also when a client
drops mid-protocol; no upload reaches the server unmasked, nor the framework one by one; the
protocol's bytes are the serialized size of its Flower messages. Refusals are one line."""

from __future__ import annotations

import io
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import run_tiny, tiny_config

pytest.importorskip("flwr")

from fedtune.errors import FedtuneError  # noqa: E402
from fedtune.frameworks.base import SUMMED  # noqa: E402
from fedtune.frameworks.fedavg import FedAvgFramework  # noqa: E402
from fedtune.runtimes import flower_app, flower_compat, flower_worker  # noqa: E402
from fedtune.strategies.fedavg import FedAvg  # noqa: E402
from fedtune.wire import deserialize  # noqa: E402

CLIP, LEVELS, CLIENTS, DROPS = 4.0, 2**20, 3, (2, 1)  # client 1 fails its round 2 after SecAgg+'s key stages


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    """One 2-round SecAgg+ run on flower-sim (with DP-SGD on the clients, which keep its accountant
    as state) with spies on the clients' plaintext uploads, on every message the server exchanges
    and on what the framework's aggregate receives."""
    mp = pytest.MonkeyPatch()
    uploads, aggregated, exchanged = defaultdict(dict), {}, []
    client_round, exchange, aggregate = flower_worker.client_round, flower_app.exchange, FedAvgFramework.aggregate

    def spy_client(control, blob, state):
        rnd, cid = int(control["round"]), int(control["client"])
        if (rnd, cid) == DROPS:
            raise RuntimeError("this client drops out")
        up, record, new_state = client_round(control, blob, state)
        uploads[rnd][cid] = (up, record["num_samples"])
        return up, record, new_state

    def spy_exchange(grid, messages, timeout, seconds=None, **kw):
        replies = exchange(grid, messages, timeout, seconds, **kw)
        if any(flower_compat.is_secagg(m) for m in messages.values()):
            exchanged.append((list(messages.values()), list(replies.values())))
        return replies

    def spy_aggregate(self, rnd, results):
        aggregated[rnd] = {k: (msg.tensors, dict(m)) for k, (msg, m) in results.items()}
        return aggregate(self, rnd, results)

    mp.setattr(flower_worker, "client_round", spy_client)
    mp.setattr(flower_app, "exchange", spy_exchange)
    mp.setattr(FedAvgFramework, "aggregate", spy_aggregate)
    try:
        cfg = tiny_config(tmp_path_factory.mktemp("secagg"), runtime="flower-sim", fed__clients=CLIENTS,
                          data__partition="dirichlet", data__dirichlet_alpha=1.0, privacy__dp_sgd=True,
                          privacy__noise_multiplier=0.5, privacy__secagg=True,
                          privacy__secagg_clip_range=CLIP, privacy__secagg_quantization_range=LEVELS)
        _, rundir = run_tiny(cfg)
    finally:
        mp.undo()
    return uploads, aggregated, exchanged, rundir.metrics.records()


def test_secagg_sum_is_the_fedavg_of_the_uploads_within_quantisation(secagg_run):
    uploads, aggregated, _, records = secagg_run
    weights = {r["client"]: r["num_samples"] for r in records if r["round"] == 1 and r["client"] != "server"}
    assert len(set(weights.values())) > 1  # unequal weights: the weighting is exercised
    max_weight = max(weights.values())  # the bound the server hands SecAgg+ (the largest client's rows)
    for rnd in (1, 2):
        ups = {cid: (deserialize(blob).tensors, w) for cid, (blob, w) in uploads[rnd].items()}
        assert sorted(ups) == ([0, 1, 2] if rnd == 1 else [0, 2])  # round 2: client 1 dropped mid-protocol
        # The framework got one upload, the weighted mean of the total weight, never a client's own.
        assert list(aggregated[rnd]) == [SUMMED]
        got, meta = aggregated[rnd][SUMMED]
        assert meta == {"num_samples": sum(w for _, w in ups.values())}
        plain = FedAvg().aggregate({}, list(ups.values()))  # fedtune's plaintext FedAvg of the same uploads
        # SecAgg+ sends each client's d_i * p_i with d_i = round(w_i / W * L) / L, stochastically
        # rounded to steps of 2c/L (error < one step each), and divides the sum by sum(d_i); d_i differs
        # from w_i / W by <= 1/(2L). float32 storage adds a relative 2**-24.
        d = {cid: round(w / max_weight * LEVELS) / LEVELS for cid, (_, w) in ups.items()}
        n, step = len(ups), 2 * CLIP / LEVELS
        for name, mean in plain.items():
            spread = max(float((t[name].double() - mean.double()).abs().max()) for t, _ in ups.values())
            bound = (n * step + n / (2 * LEVELS) * spread) / sum(d.values()) + 2**-24 * float(mean.abs().max())
            err = float((got[name].double() - mean.double()).abs().max())
            assert err <= bound, f"round {rnd} {name}: |secagg - fedavg| = {err:.3g} > quantisation bound {bound:.3g}"
            assert err > 0 or n * step == 0  # it is SecAgg+'s sum, not a plaintext mean passed along


def test_secagg_server_never_holds_an_unmasked_upload(secagg_run):
    uploads, _, exchanged, _ = secagg_run
    masked_seen = 0
    for messages, replies in exchanged:
        rnd = int(messages[0].metadata.group_id)
        for reply in replies:
            if reply.has_error():
                continue
            content = reply.content
            if "fitres.parameters" in content.array_records:  # the masking stage's reply
                assert len(content.array_records["fitres.parameters"]) == 0  # the plaintext stayed home
            record = content.config_records[flower_compat.SECAGG_RECORD]
            if "masked_params" not in record:
                continue
            cid = json.loads(content.config_records["fitres.metrics"]["record"])["client"]
            tensors, w = deserialize(uploads[rnd][cid][0]).tensors, uploads[rnd][cid][1]
            masked = [np.load(io.BytesIO(b)) for b in record["masked_params"]][1:]  # [0]: the weight
            for arr, name in zip(masked, sorted(tensors), strict=True):
                # What the vector would be unmasked: the quantised update (ratio <= 1 bounds it by L).
                plain = (tensors[name].double().numpy() + CLIP) * LEVELS / (2 * CLIP)
                near = np.abs(arr.astype(np.float64) - plain) <= LEVELS  # within the whole plaintext range
                assert near.mean() < 0.01, f"client {cid}'s {name} reached the server unmasked"
            masked_seen += 1
    assert masked_seen == 3 + 2  # every client that finished a round, and nothing else


def test_secagg_bytes_are_the_serialized_flower_messages(secagg_run):
    from flwr.common.serde import message_to_proto

    _, _, exchanged, records = secagg_run
    down, up, masked = defaultdict(int), defaultdict(int), defaultdict(int)
    for messages, replies in exchanged:
        rnd = int(messages[0].metadata.group_id)
        for m in messages:
            down[rnd, m.metadata.dst_node_id] += len(message_to_proto(m).SerializeToString())
        for r in replies:
            up[rnd, r.metadata.src_node_id] += len(message_to_proto(r).SerializeToString())
            if not r.has_error():
                masked[rnd, r.metadata.src_node_id] += sum(
                    len(b) for b in r.content.config_records[flower_compat.SECAGG_RECORD].get("masked_params", []))
    for rnd in (1, 2):
        clients = [r for r in records if r["round"] == rnd and r["client"] != "server"]
        server = next(r for r in records if r["round"] == rnd and r["client"] == "server")
        nodes = {k[1] for k in down if k[0] == rnd}
        assert len(clients) == (3 if rnd == 1 else 2) and len(nodes) == 3
        for key, counted in (("secagg_bytes_down", down), ("secagg_bytes_up", up)):
            total = sum(v for k, v in counted.items() if k[0] == rnd)
            assert server[key] == total > 0  # every node's messages, the dropped client's too
            assert sorted(c[key] for c in clients) == sorted(
                v for k, v in counted.items() if k[0] == rnd and masked[k] > 0)
        # bytes_up is the masked vector (int64: twice the float32 upload), part of secagg_bytes_up
        assert sorted(c["bytes_up"] for c in clients) == sorted(v for k, v in masked.items() if k[0] == rnd and v)
        assert all(c["secagg_bytes_up"] > c["bytes_up"] > c["bytes_down"] for c in clients)
        assert server["secagg_server_seconds"] > 0 and all(c["secagg_client_seconds"] > 0 for c in clients)
        assert "aggregation_error" not in server  # it needs each client's factors, which the server never sees
    assert server["dropped"] == [1] and "drops out" in server["client_errors"]["1"]


def test_secagg_carries_each_clients_state(secagg_run):
    """A client's state (DP-SGD's accountant here) travels beside its masked vector, as control data:
    its epsilon keeps growing from round to round."""
    eps = {(r["round"], r["client"]): r["epsilon"] for r in secagg_run[3] if r["client"] != "server"}
    assert eps[2, 0] > eps[1, 0] > 0 and eps[2, 2] > eps[1, 2] > 0


@pytest.mark.parametrize("overrides, match", [
    (dict(privacy__secagg=True), "use --runtime flower-sim or flower"),
    (dict(runtime="flower-sim", privacy__secagg=True, framework="kd"), "needs framework=fedavg"),
    (dict(runtime="flower-sim", privacy__secagg=True, fed__strategy="median"), "fed.strategy=median needs each"),
    (dict(runtime="flower", privacy__secagg=True, fed__strategy="scaffold"), "fed.strategy=scaffold needs each"),
    (dict(runtime="flower-sim", privacy__secagg=True, privacy__central_dp=True), "privacy.central_dp clips"),
    (dict(runtime="flower-sim", privacy__secagg=True, fed__fraction=0.3), ">= 2 sampled clients"),
    (dict(runtime="flower-sim", privacy__secagg=True, privacy__secagg_quantization_range=2**31),
     "privacy.secagg_quantization_range must be in"),
    (dict(runtime="flower-sim", privacy__secagg=True, privacy__secagg_reconstruction_threshold=1.5),
     "privacy.secagg_reconstruction_threshold"),
])
def test_secagg_refusals_are_one_line(tmp_path, overrides, match):
    with pytest.raises(FedtuneError, match=match) as err:
        tiny_config(tmp_path, **overrides)
    assert "\n" not in str(err.value)


def test_secagg_client_refuses_values_it_would_clip(monkeypatch):
    """An upload beyond privacy.secagg_clip_range would be clipped by SecAgg+ silently: refused."""
    from flwr.app import Context, RecordDict

    from fedtune.config import to_dict
    from fedtune.wire import Message, serialize

    cfg = tiny_config(None, runtime="flower-sim", privacy__secagg=True, privacy__secagg_clip_range=1.0)
    ctx = Context(1, 1, {"partition-id": 0}, RecordDict(), {})

    def fit(values):
        up = serialize(Message({"w": torch.tensor(values)}))
        monkeypatch.setattr(flower_app, "_round", lambda control, blob, state, context: (up, {"num_samples": 3}, None))
        return flower_app._secagg_fit(b"", {"round": 1, "client": 0, "config": json.dumps(to_dict(cfg))}, ctx)

    with pytest.raises(ValueError, match="magnitude 2 exceeds privacy.secagg_clip_range=1"):
        fit([0.5, -2.0])
    arrays, weight, metrics = fit([0.5, -1.0])
    assert weight == 3 and np.array_equal(arrays[0], np.array([0.5, -1.0], dtype=np.float32))
    assert json.loads(metrics["layout"])["tensors"] == [["w", "F32", [2]]]


@pytest.mark.slow
def test_secagg_on_a_local_deployment(tmp_path):
    """SecAgg+ across processes: a SuperLink and 3 SuperNodes on 127.0.0.1, each stage's message a
    fresh ClientApp process (SecAgg+'s keys and shares live in Flower's node state between them),
    the rounds in the nodes' warm workers. The model learns as the plaintext run does."""
    from fedtune.rundir import RunDir
    from fedtune.runtimes.flower import run_deployment

    kw = dict(data__test_size=100, fed__rounds=1)  # each SecAgg+ stage starts 3 ClientApp processes: one round
    plain, _ = run_tiny(tiny_config(tmp_path / "plain", runtime="flower-sim", **kw))
    cfg = tiny_config(tmp_path / "secagg", runtime="flower", privacy__secagg=True, flower__local_tls=False,
                      flower__local_auth=False, flower__wait_nodes_s=300, **kw)
    rundir = RunDir.create(cfg)
    summary = run_deployment(cfg, rundir)
    records = rundir.metrics.records()
    server = [r for r in records if r["client"] == "server"]
    assert [r["clients"] for r in server] == [[0, 1, 2]]
    assert all(r["secagg_bytes_up"] > r["secagg_bytes_down"] > 0 for r in server)
    clients = [r for r in records if r["client"] != "server"]
    assert all(c["secagg_bytes_up"] > c["bytes_up"] > c["bytes_down"] > 0 for c in clients)
    # Stochastic rounding is SecAgg+'s: the accuracy is the plaintext run's within a few test rows.
    assert abs(summary["final_test_accuracy"] - plain["final_test_accuracy"]) <= 0.03


@pytest.mark.slow
def test_secagg_run_resumes_to_the_same_metrics(tmp_path):
    """Stopped after round 1's checkpoint and resumed, a SecAgg+ run ends as the uninterrupted one:
    the sum's stochastic rounding is seeded per (seed, round, client), the clients' states (DP-SGD's
    accountant) come back from the checkpoint."""
    from test_frameworks import TIMING

    from fedtune.console import Progress
    from fedtune.rundir import RunDir
    from fedtune.runtimes import run

    class Stop(Progress):
        def round_done(self, rnd, record):
            if rnd == 1:
                raise RuntimeError("stopped")

    kw = dict(runtime="flower-sim", privacy__secagg=True, privacy__dp_sgd=True, privacy__noise_multiplier=0.5,
              data__test_size=100)
    _, whole = run_tiny(tiny_config(tmp_path / "a", **kw))
    cut = tiny_config(tmp_path / "b", **kw)
    rundir = RunDir.create(cut)
    with pytest.raises(RuntimeError, match="stopped"):
        run(cut, rundir, Stop())
    reopened, cfg = RunDir.open(rundir.path)
    run(cfg, reopened, resume=True)
    # The records' own JSON rides in the messages: its timings' digits move the byte counts a little.
    drop = TIMING | {"secagg_client_seconds", "secagg_server_seconds", "secagg_bytes_up", "secagg_bytes_down"}
    same = [[{k: v for k, v in r.items() if k not in drop} for r in d.metrics.records()] for d in (whole, reopened)]
    assert same[0] == same[1] and len(same[0]) == 2 * 4
