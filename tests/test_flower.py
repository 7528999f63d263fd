"""The Flower runtimes: parity with the in-process runtime (simulation), a TLS + SuperNode-
authenticated deployment on 127.0.0.1 that survives a killed client, and the split channel."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import threading
import time

import pytest
import torch
from conftest import run_tiny, tiny_config

pytest.importorskip("flwr")

from fedtune.errors import FedtuneError  # noqa: E402
from fedtune.wire import Message, deserialize, serialize  # noqa: E402
from fedtune.runtimes.certs import make_tls  # noqa: E402
from fedtune.runtimes.channel import ChannelClient, ChannelServer  # noqa: E402
from fedtune.runtimes.rounds import MeteredLink  # noqa: E402


def _by_round(records):
    return {(r["round"], r["client"]): r for r in records}


# --------------------------------------------------------------------------- split channel


def test_channel_tls_meters_bytes_and_refuses_strangers(tmp_path):
    tls = make_tls(tmp_path)
    seen = []

    def handler(rnd, cid, blob):
        msg = deserialize(blob)
        seen.append((rnd, cid))
        if msg.meta.get("fail"):
            raise ValueError("boom")
        return serialize(Message({"y": msg.tensors["x"] * 2}, {"n": len(seen)}))

    server = ChannelServer(handler, certfile=str(tls.cert), keyfile=str(tls.key), ca_certfile=str(tls.ca_cert))
    try:
        with ChannelClient(server.info, 3, 1) as transport:
            link = MeteredLink(transport)
            sent = [Message({"x": torch.arange(i + 1.0)}) for i in range(5)]
            replies = [link.exchange(m) for m in sent]
            assert [r.meta["n"] for r in replies] == [1, 2, 3, 4, 5]
            assert torch.equal(replies[-1].tensors["y"], torch.arange(5.0) * 2)
            assert link.bytes_up == sum(len(serialize(m)) for m in sent)
            assert link.bytes_down == sum(len(serialize(r)) for r in replies)
            with pytest.raises(FedtuneError, match="boom"):  # the server's error, not a hang
                link.exchange(Message({"x": torch.zeros(1)}, {"fail": True}))
        assert seen[0] == (3, 1)
        stranger = dataclasses.replace(server.info, token="0" * 32)
        with pytest.raises(FedtuneError, match="UNAUTHENTICATED"):
            ChannelClient(stranger, 1, 0)(b"x")
        plaintext = dataclasses.replace(server.info, root_certificates=None)
        with pytest.raises(FedtuneError):  # a TLS server does not talk plaintext
            ChannelClient(plaintext, 1, 0, timeout_s=5)(b"x")
    finally:
        server.stop()


# --------------------------------------------------------------------------- simulation


FRAMEWORKS = ["fedavg"] + (["kd"] if importlib.util.find_spec("fedtune.frameworks.kd") else [])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_simulation_matches_inprocess(tmp_path, framework):
    """Deterministic: the same seed gives the same accuracy (to 1e-6) and the same bytes."""
    rounds = 2 if framework == "fedavg" else 1
    kw = dict(framework=framework, fed__rounds=rounds, data__test_size=100)
    ref, ref_dir = run_tiny(tiny_config(tmp_path / "a", **kw))
    sim, sim_dir = run_tiny(tiny_config(tmp_path / "b", runtime="flower-sim", **kw))
    assert sim["rounds"] == rounds
    assert abs(sim["final_test_accuracy"] - ref["final_test_accuracy"]) <= 1e-6
    assert abs(sim["final_test_loss"] - ref["final_test_loss"]) <= 1e-6
    a, b = _by_round(ref_dir.metrics.records()), _by_round(sim_dir.metrics.records())
    assert a.keys() == b.keys()
    for key, rec in a.items():
        if key[1] != "server":
            assert (b[key]["bytes_up"], b[key]["bytes_down"]) == (rec["bytes_up"], rec["bytes_down"]) > (0, 0)
    if framework == "fedavg":
        assert ref["final_test_accuracy"] > 0.3  # it learned (chance is 0.25)


def test_flower_config_is_validated():
    with pytest.raises(FedtuneError, match="flower.sim_backend"):
        tiny_config(runtime="flower-sim", flower__sim_backend="dask")


# --------------------------------------------------------------------------- deployment


@pytest.mark.slow
def test_deployment_tls_auth_and_killed_client(tmp_path):
    """SuperLink + 3 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication, 2 rounds
    of fedavg. An unregistered SuperNode is refused. SuperNode 2 is killed (SIGKILL, with its
    ClientApp) as round 2 starts: the round closes with the others after fed.client_timeout_s
    and the server record says who dropped. Nothing is left running afterwards."""
    from fedtune.rundir import RunDir
    from fedtune.runtimes.flower import LocalFederation, run_deployment

    cfg = tiny_config(tmp_path, runtime="flower", data__test_size=100, train__threads=1,
                      fed__client_timeout_s=75, flower__wait_nodes_s=120)
    rundir = RunDir.create(cfg)
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = run_deployment(cfg, rundir, federation=fed)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = exc

    with LocalFederation(tmp_path / "fed", rundir.path / "flower", tls=True, auth=True) as fed:
        fed.start_superlink()
        nodes = [fed.start_supernode(cid, 3) for cid in range(3)]
        intruder = fed.start_supernode(3, 3, register=False)
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 400
        while not any(r["client"] == "server" for r in rundir.metrics.records()):
            assert runner.is_alive(), outcome
            assert time.monotonic() < deadline, "round 1 did not finish"
            time.sleep(0.5)
        os.killpg(nodes[2].pid, signal.SIGKILL)
        runner.join(400)
        assert not runner.is_alive(), "the server hung on the killed client"
        assert intruder.poll() is not None, "an unregistered SuperNode stayed connected"
    assert "error" not in outcome, outcome.get("error")
    assert all(p.poll() is not None for p in [*nodes, intruder]) and not fed.procs
    assert not fed.leftovers(), "processes left behind"

    summary = outcome["summary"]
    assert summary["rounds"] == 2 and summary["final_test_accuracy"] is not None
    server = {r["round"]: r for r in rundir.metrics.records() if r["client"] == "server"}
    assert server[1]["clients"] == [0, 1, 2] and "dropped" not in server[1]
    assert server[2]["clients"] == [0, 1] and server[2]["dropped"] == [2]
    assert json.loads((rundir.path / "summary.json").read_text())["rounds"] == 2
    # The refused SuperNode's log says why.
    assert "failed to activate supernode" in (rundir.path / "flower" / "supernode3.log").read_text().lower()
    assert "no supernode found with the given public key" in (rundir.path / "flower" / "superlink.log").read_text().lower()
