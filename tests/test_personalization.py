"""Personalization (fed.personalization) and the clients' own test rows (data.client_test_size).

One battery over every registered method, its configuration chosen from its traits: it runs from
the CLI with a TOML file, resumes exactly after a kill, saves adapters/client-K/, and no upload
ever carries a client's personal tensors (bytes counted = bytes serialized). Then each method's
math by hand: what is shared, what stays, Ditto's gradient, the dual adapter's sum."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_tiny, tiny_config
from test_frameworks import TIMING, KillAt, strip
from fedtune.cli import main
from fedtune.console import Progress
from fedtune.errors import FedtuneError
from fedtune.frameworks import get
from fedtune.frameworks.base import Context
from fedtune.personalization import PERSONAL, PERSONALIZATION, client_stats, percentile
from fedtune.rundir import RunDir
from fedtune.runtimes import run
from fedtune.runtimes.inprocess import InProcessGrid
from fedtune.runtimes.rounds import run_rounds
from fedtune.strategies.base import split_extras
from fedtune.wire import deserialize

METHODS = [m for m in PERSONALIZATION.names if m != "none"]
CLIENT_TEST = 20


def settings(method: str) -> dict:
    """The keys a method needs, read from its traits."""
    out = {"fed.personalization": method}
    if PERSONALIZATION.has(method, "cut"):
        out.update({"framework": "split", "split.split_layer": 1})
    else:
        out["data.client_test_size"] = CLIENT_TEST
    if PERSONALIZATION.has(method, "virtual_tokens"):
        out["model.peft"] = "prompt"
    return out


def overrides(method: str, **kw) -> dict:
    return {k.replace(".", "__"): v for k, v in {**settings(method), **kw}.items()}


def write_toml(path, method: str) -> str:
    values = {**TINY, **settings(method)}
    sections: dict[str, dict] = {}
    top = {}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".")
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_from_toml_and_resumes_exactly(tmp_path, method):
    out = tmp_path / "whole"
    assert main(["run", "--config", write_toml(tmp_path / "p.toml", method), "--out", str(out), "--quiet"]) == 0
    whole = RunDir(out)
    cut = tiny_config(tmp_path / "b", **overrides(method))
    rundir = RunDir.create(cut)
    with pytest.raises(KeyboardInterrupt):
        run(cut, rundir, KillAt(rnd=2, after=1))
    reopened, cfg = RunDir.open(rundir.path)
    run(cfg, reopened, resume=True)
    records = whole.metrics.records()
    assert strip(records) == strip(reopened.metrics.records())
    summary = json.loads((out / "summary.json").read_text())
    for cid in range(cut.fed.clients):
        adapter = out / "adapters" / f"client-{cid}"
        assert (adapter / "adapter_model.safetensors").is_file()
        assert f"--client {cid}" in (adapter / "README.md").read_text()
    if cut.data.client_test_size:
        clients = [r for r in records if r["client"] != "server"]
        assert all(0.0 <= r["client_test_accuracy"] <= 1.0 for r in clients)
        server = [r for r in records if r["client"] == "server"][-1]
        assert server["client_test_accuracy_worst"] <= server["client_test_accuracy_p10"] \
            <= server["client_test_accuracy_mean"]
        assert summary["client_test_accuracy_mean"] == server["client_test_accuracy_mean"]


class Capture(InProcessGrid):
    """The in-process grid, keeping each upload blob and each client's last kept state."""

    def fit(self, rnd, blobs, restore, on_reply):
        self.blobs = getattr(self, "blobs", {})
        self.states = getattr(self, "states", {})

        def keep(cid, reply):
            self.blobs[rnd, cid] = reply.blob
            if reply.state is not None:
                self.states[cid] = reply.state
            on_reply(cid, reply)

        return super().fit(rnd, blobs, restore, keep)


def one_round(tmp_path, method: str, **kw):
    cfg = tiny_config(tmp_path, fed__rounds=1, **overrides(method, **kw))
    rundir = RunDir.create(cfg)
    fw = get(cfg.framework)(Context.build(cfg))
    grid = Capture(fw, Progress())
    run_rounds(fw, grid, rundir)
    return fw, grid, rundir


@pytest.mark.parametrize("method", METHODS)
def test_uploads_never_carry_personal_state(tmp_path, method):
    fw, grid, rundir = one_round(tmp_path, method)
    clients = [r for r in rundir.metrics.records() if r["client"] != "server"]
    for r in clients:
        blob = grid.blobs[1, r["client"]]
        assert r["bytes_up"] == len(blob) + r.get("bytes_up_link", 0)
        up = split_extras(deserialize(blob).tensors)[0]
        personal = grid.states[r["client"]][PERSONAL]
        if fw.personal.init:  # a part of the model: only the shared part travels
            assert set(up) == set(fw.global_state)
            assert not set(up) & (set(fw.personal.init) - set(fw.global_state))
            assert all(up[k].shape == fw.global_state[k].shape for k in up)
        else:  # a whole personal model beside the global one: the upload is the global update
            assert set(up) == set(personal) and any(not torch.equal(up[k], personal[k]) for k in up)

def test_what_each_method_shares_and_keeps(tmp_path):
    cfg = tiny_config(tmp_path, model__lora_r=4)
    state = get("fedavg")(Context.build(cfg)).global_state
    head = {k for k in state if "modules_to_save" in k}
    b = {k for k in state if ".lora_B." in k}
    assert head and b
    for method, kept in (("head", head), ("rep", head), ("lora_b", b)):
        p = PERSONALIZATION.load(method)(tiny_config(tmp_path, fed__personalization=method))
        shared, personal = p.split(state)
        assert set(personal) == kept and set(shared) == set(state) - kept
        assert p.merge(shared, personal).keys() == state.keys()
    # dual_lora: the leading lora_r/2 components are shared, the trailing ones personal
    dual = PERSONALIZATION.load("dual_lora")(tiny_config(tmp_path, fed__personalization="dual_lora", model__lora_r=4))
    shared, personal = dual.split(state)
    a_key = next(k for k in state if ".lora_A." in k)
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    assert shared[a_key].shape[0] == 2 and personal[a_key].shape[0] == 2 and shared[b_key].shape[1] == 2
    merged = dual.merge(shared, personal)
    assert all(torch.equal(merged[k], state[k]) for k in state)
    assert set(personal) == {k for k in state if ".lora_" in k}  # the head is shared


def test_the_dual_adapter_is_the_sum_of_two_adapters():
    torch.manual_seed(0)
    a_s, a_p, b_s, b_p = torch.randn(2, 6), torch.randn(2, 6), torch.randn(5, 2), torch.randn(5, 2)
    x = torch.randn(3, 6)
    joint = x @ torch.cat([a_s, a_p]).T @ torch.cat([b_s, b_p], 1).T
    assert torch.allclose(joint, x @ a_s.T @ b_s.T + x @ a_p.T @ b_p.T, atol=1e-6)


def test_dual_lora_uploads_the_shared_half_only(tmp_path):
    fw, grid, rundir = one_round(tmp_path, "dual_lora", model__lora_r=4)
    up = split_extras(deserialize(grid.blobs[1, 0]).tensors)[0]
    a = [v for k, v in up.items() if ".lora_A." in k]
    assert a and all(t.shape[0] == 2 for t in a)
    kept = grid.states[0][PERSONAL]
    assert all(t.shape[0] == 2 for k, t in kept.items() if ".lora_A." in k)
    # the server's global model is the shared adapter alone: the personal B is zero there
    fw.global_model()
    for n, p in fw.ctx.model.named_parameters():
        if ".lora_B." in n:
            assert torch.count_nonzero(p[:, 2:]) == 0


def test_ditto_gradient_is_task_gradient_plus_lambda_pull(tmp_path):
    cfg = tiny_config(tmp_path, fed__personalization="ditto", fed__ditto_lambda=0.3)
    fw = get("fedavg")(Context.build(cfg))
    params = {n: p for n, p in fw.ctx.model.named_parameters() if p.requires_grad}
    global_w = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    task = {n: torch.randn_like(p) for n, p in params.items()}
    for n, p in params.items():
        p.grad = task[n].clone()
    fw.personal.rule(fw, global_w)()
    for n, p in params.items():
        assert torch.allclose(p.grad, task[n] + 0.3 * (p.detach() - global_w[n]), atol=1e-6)


def test_personal_models_differ_from_the_global_and_stay_apart(tmp_path):
    fw, grid, _ = one_round(tmp_path, "finetune")
    received = fw.personal.global_view(fw.global_state)
    kept = [grid.states[c][PERSONAL] for c in range(3)]
    head = next(k for k in kept[0] if "modules_to_save" in k)
    assert not torch.equal(kept[0][head], kept[1][head])
    assert not torch.equal(kept[0][head], received[head])
    fw, grid, _ = one_round(tmp_path / "h", "head")
    heads = [grid.states[c][PERSONAL] for c in range(3)]
    assert all(set(h) == set(fw.personal.init) for h in heads)
    assert not set(fw.global_state) & set(fw.personal.init)  # the server never holds a head


def test_fedrep_trains_the_head_with_the_adapter_frozen_then_the_adapter(tmp_path):
    """A round of FedRep with no adapter epochs' effect on the head: the kept head is the one its
    head phase trained, and the uploaded adapter moved while the head stood still."""
    fw, grid, _ = one_round(tmp_path, "rep")
    r = [x for x in RunDir(fw.cfg.out).metrics.records() if x["client"] == 0][0]
    assert r["client_flops_personal"] > 0 and r["client_flops"] > r["client_flops_personal"]
    up = split_extras(deserialize(grid.blobs[1, 0]).tensors)[0]
    assert not any("modules_to_save" in k for k in up)


def test_client_test_rows_follow_the_partition_and_never_train(tmp_path):
    cfg = tiny_config(tmp_path, data__client_test_size=15, data__partition="dirichlet", data__dirichlet_alpha=0.3)
    base = tiny_config(tmp_path, data__partition="dirichlet", data__dirichlet_alpha=0.3)
    from fedtune.data import load

    fed, plain = load(cfg.data, 3, 0), load(base.data, 3, 0)
    for c in range(3):
        train, test, whole = fed.clients[c], fed.client_tests[c], plain.clients[c]
        assert len(test) == min(15, len(whole) // 2)
        assert sorted(train.texts + test.texts) == sorted(whole.texts)  # its own shard, split in two
        assert not set(train.texts) & set(test.texts) or len(set(whole.texts)) < len(whole.texts)
    assert plain.client_tests == []


def test_client_stats_by_hand():
    assert percentile([0.1, 0.5, 0.2, 0.9], 10) == pytest.approx(0.1 + 0.3 * 0.1)
    stats = client_stats([{"client_test_accuracy": v, "client_test_loss": 2 * v} for v in (0.5, 0.25, 1.0)]
                         + [{"train_loss": 1}])
    assert stats == {"client_test_accuracy_mean": pytest.approx(7 / 12), "client_test_accuracy_worst": 0.25,
                     "client_test_accuracy_p10": pytest.approx(0.3), "client_test_loss_mean": pytest.approx(7 / 6),
                     "client_test_loss_worst": 2.0}
    assert client_stats([{"train_loss": 1}]) == {}


def test_global_fedavg_scores_the_received_model_and_kd_its_own(tmp_path):
    s, rd = run_tiny(tiny_config(tmp_path / "g", data__client_test_size=CLIENT_TEST))
    assert "client_test_accuracy_mean" in s and not (rd.path / "adapters").exists()
    first = [r for r in rd.metrics.records() if r["round"] == 1 and r["client"] != "server"]
    assert len({r["client_test_accuracy"] for r in first}) >= 1
    s, rd = run_tiny(tiny_config(tmp_path / "k", framework="kd", kd__client_eval_size=50,
                                 data__client_test_size=CLIENT_TEST))
    clients = [r for r in rd.metrics.records() if r["client"] != "server"]
    assert all("client_test_accuracy" in r and "client_global_test_accuracy" in r for r in clients)
    assert "client_test_accuracy_p10" in s


def test_flower_simulation_equals_inprocess_with_a_personal_method(tmp_path):
    _, ref = run_tiny(tiny_config(tmp_path / "a", **overrides("head")))
    _, sim = run_tiny(tiny_config(tmp_path / "b", runtime="flower-sim", **overrides("head")))
    drop = TIMING | {"runtime"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in ref.metrics.records()] == \
        [{k: v for k, v in r.items() if k not in drop} for r in sim.metrics.records()]
    for cid in range(3):  # the personal adapters the server's loop saved from the nodes' states
        assert (sim.path / "adapters" / f"client-{cid}" / "adapter_model.safetensors").read_bytes() == \
            (ref.path / "adapters" / f"client-{cid}" / "adapter_model.safetensors").read_bytes()


def test_generate_and_export_use_a_clients_personal_adapter(tmp_path, capsys):
    _, rd = run_tiny(tiny_config(tmp_path / "r", fed__rounds=1, **overrides("head")))
    assert main(["export", str(rd.path), "--client", "1", "--merged", str(tmp_path / "c1")]) == 0
    assert main(["export", str(rd.path), "--merged", str(tmp_path / "g")]) == 0
    from safetensors.torch import load_file

    mine, glob = load_file(tmp_path / "c1" / "model.safetensors"), load_file(tmp_path / "g" / "model.safetensors")
    head = [k for k in mine if "score" in k or "classifier" in k]
    assert head and any(not torch.equal(mine[k], glob[k]) for k in head)
    assert main(["export", str(rd.path), "--client", "7", "--merged", str(tmp_path / "x")]) == 2
    assert "no personal adapter for client 7" in capsys.readouterr().err


@pytest.mark.parametrize("keys, words", [
    ({"framework": "kd", "fed.personalization": "head"}, "personal_weights"),
    ({"fed.personalization": "lora_b", "model.peft": "ia3"}, "model.peft"),
    ({"fed.personalization": "prompt"}, "model.peft"),
    ({"fed.personalization": "client_part"}, "framework"),
    ({"fed.personalization": "dual_lora", "model.lora_r": 5}, "even"),
    ({"fed.personalization": "head", "fed.strategy": "scaffold"}, "does not combine"),
    ({"framework": "zo", "data.client_test_size": 10}, "data.client_test_size"),
    ({"fed.personalization": "nope"}, "fed.personalization must be one of"),
])
def test_methods_that_do_not_fit_are_one_line_errors(tmp_path, keys, words):
    with pytest.raises(FedtuneError) as err:
        tiny_config(tmp_path, **{k.replace(".", "__"): v for k, v in keys.items()})
    text = str(err.value)
    assert "\n" not in text and (words in text or words == "personal_weights" and "fedavg" in text)


def test_sft_clients_report_their_own_response_loss(tmp_path, capsys):
    from test_sft import arithmetic, sft_config, write_jsonl

    write_jsonl(tmp_path / "data/train.jsonl", arithmetic(90))
    write_jsonl(tmp_path / "data/test.jsonl", arithmetic(12, start=200))
    cfg = sft_config(tmp_path, tmp_path / "data", data__partition="length", data__client_test_size=5,
                     fed__personalization="dual_lora", model__lora_r=4, eval__metric="none")
    summary, rd = run_tiny(cfg)
    clients = [r for r in rd.metrics.records() if r["client"] != "server"]
    assert all(r["client_test_loss"] > 0 for r in clients)
    assert summary["client_test_loss_worst"] >= summary["client_test_loss_mean"] > 0
    assert (rd.path / "adapters" / "client-2" / "adapter_model.safetensors").is_file()
    assert main(["generate", str(rd.path), "What is 1 plus 1?", "--client", "2", "--max-new-tokens", "3"]) == 0


def test_a_personal_head_serves_skewed_clients_better_than_the_global_model(tmp_path):
    """Under strong label skew (Dirichlet 0.1 over 4 labels) each client sees few labels: the
    model it keeps for itself scores far better on its own rows than the global model does."""
    skew = dict(data__partition="dirichlet", data__dirichlet_alpha=0.1, data__client_test_size=20, fed__rounds=3)
    scores = {m: run_tiny(tiny_config(tmp_path / m, fed__personalization=m, **skew))[0]["client_test_accuracy_mean"]
              for m in ("none", "head", "rep")}
    assert scores["head"] > scores["none"] + 0.1 and scores["rep"] > scores["none"] + 0.1
