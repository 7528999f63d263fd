"""The Flower runtimes: parity with the in-process runtime (simulation and deployment, split
learning included), resume, the thread backend and the version fence, a TLS + SuperNode-
authenticated deployment on 127.0.0.1 that survives a killed client, and the split channel."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
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
from fedtune.console import Progress  # noqa: E402
from fedtune.rundir import RunDir  # noqa: E402
from fedtune.runtimes import run  # noqa: E402

BYTES = ("bytes_up", "bytes_down", "bytes_up_link", "bytes_down_link")
TIMING = {"client_seconds", "client_peak_mem_bytes", "server_seconds", "round_seconds", "message_seconds"}


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


PARITY = {"fedavg": dict(fed__rounds=2), "kd": dict(fed__rounds=1),
          "split": dict(fed__rounds=1, split__split_layer=1, data__private_size=60)}


def _same_run(ref, ref_dir, other, other_dir):
    """Same accuracy and loss to 1e-6, and every client record carries the same bytes."""
    assert other["rounds"] == ref["rounds"]
    assert abs(other["final_test_accuracy"] - ref["final_test_accuracy"]) <= 1e-6
    assert abs(other["final_test_loss"] - ref["final_test_loss"]) <= 1e-6
    a, b = _by_round(ref_dir.metrics.records()), _by_round(other_dir.metrics.records())
    assert a.keys() == b.keys()
    for key, rec in a.items():
        if key[1] != "server":
            assert {k: b[key].get(k) for k in BYTES} == {k: rec.get(k) for k in BYTES}
            assert (rec["bytes_up"], rec["bytes_down"]) > (0, 0)


# flower-sim == in-process for every framework: tests/test_frameworks.py (the battery).


def test_simulation_runs_clientapps_on_the_thread_backend(tmp_path, monkeypatch):
    """Every message of a flower-sim run is processed by fedtune's ThreadBackend, in this
    process, and Ray is never imported: no silent fallback to another backend."""
    from fedtune.runtimes import flower_compat

    calls = []
    process = flower_compat.ThreadBackend.process_message

    def spy(self, message, context):
        calls.append((os.getpid(), threading.current_thread() is not threading.main_thread(),
                      message.metadata.message_type))
        return process(self, message, context)

    monkeypatch.setattr(flower_compat.ThreadBackend, "process_message", spy)
    run_tiny(tiny_config(tmp_path, runtime="flower-sim", fed__rounds=1, data__test_size=50))
    assert sorted(calls) == [(os.getpid(), True, "query")] * 3 + [(os.getpid(), True, "train")] * 3
    assert "ray" not in sys.modules


def test_flower_version_is_checked(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.40.0")
    monkeypatch.delitem(sys.modules, "fedtune.runtimes.flower_compat")
    with pytest.raises(FedtuneError, match=r"^fedtune's Flower runtimes were written for flwr 1\.42\.0, "
                                           r"found flwr 1\.40\.0: pip install 'flwr==1\.42\.0'$"):
        importlib.import_module("fedtune.runtimes.flower_compat")


def test_flower_commands_are_found_beside_python_without_path(monkeypatch):
    """`make test` runs .venv/bin/python without .venv/bin on PATH: Flower's commands are found
    beside the interpreter, and the processes fedtune starts get their directory on PATH."""
    from pathlib import Path

    from fedtune.runtimes import flower_compat

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    bindir = Path(sys.executable).parent
    assert flower_compat.executable("flwr") == str(bindir / "flwr")
    assert flower_compat.environment({"PATH": "/usr/bin"})["PATH"].split(os.pathsep)[0] == str(bindir)
    with pytest.raises(FedtuneError, match="^no-such-flower-command not found beside "):
        flower_compat.executable("no-such-flower-command")
    assert flower_compat.run_id("Using SuperLink: x\nSuccessfully started run 1234567\n") == "1234567"


def test_deployment_clientapp_imports_no_torch():
    """A deployment ClientApp process (one per message) imports fedtune's app module, and that
    must not import torch: the round runs in the node's warm worker."""
    code = "import sys, fedtune.runtimes.flower_app; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_worker_runs_rounds_as_the_clientapp_would(tmp_path):
    """A node's warm worker (another process, over its unix socket) answers a client's rounds
    with the very bytes and records the ClientApp computes in-process, carries the client's
    state from round to round, reports a failed round as an error and keeps serving."""
    from fedtune.config import to_dict
    from fedtune.frameworks import get
    from fedtune.runtimes import flower_worker

    cfg = tiny_config(tmp_path, framework="kd", kd__client_eval_size=20, data__test_size=50)
    sock = str(tmp_path / "w.sock")
    worker = subprocess.Popen([sys.executable, "-m", "fedtune.runtimes.flower_worker", "--socket", sock])
    try:
        config = json.dumps(to_dict(cfg))
        flower_worker.ask(sock, {"config": config, "run": "1"})  # the query: builds the model
        assert os.stat(sock).st_mode & 0o777 == 0o600
        server = get("kd")(flower_worker.shared_context(cfg))
        state = {"here": None, "there": None}
        for rnd in (1, 2):
            control = {"config": config, "round": rnd, "client": 1}
            down = serialize(server.configure(rnd, 1))
            up, record, state["here"] = flower_worker.client_round(control, down, state["here"])
            got, got_record, state["there"] = flower_worker.ask(sock, {**control, "run": "1"}, down, state["there"])
            assert got == up and state["there"] is not None
            assert {k: v for k, v in got_record.items() if k not in TIMING} == \
                   {k: v for k, v in record.items() if k not in TIMING}
            if rnd == 1:
                with pytest.raises(RuntimeError, match="fedtune worker .*KeyError"):
                    flower_worker.ask(sock, {"config": config, "round": 1, "run": "1"}, down)
    finally:
        worker.kill()
        worker.wait()


class Killed(Exception):
    pass


class KillIn(Progress):
    """Stops the run as a kill would: in round ``rnd`` once ``after`` clients reported. (An
    Exception, not KeyboardInterrupt: the ServerApp runs in a thread of Flower's simulation,
    which hands an Exception back to the caller.)"""

    def __init__(self, rnd, after):
        self.rnd, self.after, self.done = rnd, after, 0

    def client_done(self, rnd, cid, record):
        self.done += rnd == self.rnd
        if self.done == self.after:
            raise Killed


RESUMED = {
    "kd": (2, dict(framework="kd", fed__rounds=3, kd__client_eval_size=50, data__test_size=100)),
    # 2 of 6 clients a round: round 3's client 3 sat out round 2, so its variate comes from disk
    # (RUN/client_states/3.pt) to its node.
    "scaffold-sparse": (3, dict(fed__strategy="scaffold", fed__clients=6, fed__fraction=0.34, fed__rounds=4,
                                data__test_size=50)),
}


@pytest.mark.parametrize("case", list(RESUMED))
def test_simulation_resume_restores_client_states(tmp_path, case):
    """kd's clients keep their local model between rounds on their node (SCAFFOLD's their
    variate). A flower-sim run killed mid-round and resumed ends with the same metrics as an
    uninterrupted one: the checkpointed client states went back to the nodes."""
    kill, kw = RESUMED[case]
    kw = dict(kw, runtime="flower-sim")
    run_tiny(tiny_config(tmp_path / "a", **kw))
    cut = tiny_config(tmp_path / "b", **kw)
    rundir = RunDir.create(cut)
    with pytest.raises(Killed):
        run(cut, rundir, KillIn(rnd=kill, after=1))
    assert max(r["round"] for r in rundir.metrics.records()) == kill
    reopened, cfg = RunDir.open(rundir.path)
    run(cfg, reopened, resume=True)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]  # noqa: E731
    assert strip(reopened.metrics.records()) == strip(RunDir(tmp_path / "a" / "run").metrics.records())


def test_flower_config_is_validated():
    with pytest.raises(FedtuneError, match="flower.sim_backend"):
        tiny_config(runtime="flower-sim", flower__sim_backend="dask")


# --------------------------------------------------------------------------- deployment


@pytest.mark.slow
def test_deployment_tls_auth_and_killed_client(tmp_path):
    """SuperLink + 3 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication, 2 rounds
    of fedavg. An unregistered SuperNode is refused. SuperNode 2 is killed (SIGKILL, with its
    ClientApp and worker) as round 2 starts: the round closes with the others after
    fed.client_timeout_s and the server record says who dropped. Each node's worker built the
    model once for the run. Nothing is left running afterwards."""
    from fedtune.runtimes.flower import LocalFederation, run_deployment

    cfg = tiny_config(tmp_path, runtime="flower", data__test_size=100, train__threads=1,
                      fed__client_timeout_s=120, flower__wait_nodes_s=300)
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
    logs = rundir.path / "flower"
    assert [(logs / f"worker{c}.log").read_text().count("built tiny-gpt2") for c in range(3)] == [1, 1, 1]
    # The refused SuperNode's log says why.
    assert "failed to activate supernode" in (rundir.path / "flower" / "supernode3.log").read_text().lower()
    assert "no supernode found with the given public key" in (rundir.path / "flower" / "superlink.log").read_text().lower()


@pytest.mark.slow
def test_deployment_split_matches_inprocess(tmp_path):
    """Split learning on a local deployment (SuperLink, SuperNodes, their warm workers): the
    per-batch traffic goes over the split channel, and accuracy and every client record's
    bytes equal the in-process run's. The workers are stopped with the federation."""
    from fedtune.runtimes.flower import run_deployment

    kw = dict(framework="split", split__split_layer=1, data__private_size=60, data__test_size=100, fed__rounds=2)
    ref, ref_dir = run_tiny(tiny_config(tmp_path / "a", **kw))
    cfg = tiny_config(tmp_path / "b", runtime="flower", flower__local_tls=False, flower__local_auth=False,
                      flower__wait_nodes_s=300, **kw)
    rundir = RunDir.create(cfg)
    summary = run_deployment(cfg, rundir)
    _same_run(ref, ref_dir, summary, rundir)
    assert all(r["bytes_up_link"] > 0 for r in rundir.metrics.records() if r["client"] != "server")
    logs = rundir.path / "flower"
    assert [(logs / f"worker{c}.log").read_text().count("built tiny-gpt2") for c in range(3)] == [1, 1, 1]
