import json

import pytest
import torch

from conftest import run_tiny, tiny_config
from fedtune import models
from fedtune.wire import Message, serialize


def server_records(rundir):
    return [r for r in rundir.metrics.records() if r["client"] == "server"]


def test_fedavg_learns_and_meters_every_round(tmp_path):
    cfg = tiny_config(tmp_path, fed__rounds=4)
    summary, rundir = run_tiny(cfg)
    server = server_records(rundir)
    clients = [r for r in rundir.metrics.records() if r["client"] != "server"]
    assert [r["round"] for r in server] == [1, 2, 3, 4]
    assert len(clients) == 4 * 3
    # Learning: well above chance (1/4) and the losses fall.
    assert summary["final_test_accuracy"] > 0.5
    assert server[-1]["test_loss"] < server[0]["test_loss"]
    losses = [sum(r["train_loss"] for r in clients if r["round"] == k) for k in (1, 4)]
    assert losses[1] < losses[0]
    # Bytes: exactly the serialized tunable state, both ways, for every client.
    state = models.get_tunable(models.build(cfg.model, 4, cfg.seed)[0])
    expected = len(serialize(Message(state)))
    assert all(r["bytes_up"] == expected and r["bytes_down"] == expected for r in clients)
    assert all(r["client_flops"] > 0 and r["client_seconds"] > 0 and r["client_peak_mem_bytes"] > 0 for r in clients)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors"):
        assert (rundir.path / name).is_file()


def test_saved_adapter_loads_with_peft_and_predicts_the_same(tmp_path):
    from peft import PeftModel

    from fedtune.data import batches, encode, load
    from fedtune.tasks.classify import ClassifyTask

    cfg = tiny_config(tmp_path, fed__rounds=1)
    _, rundir = run_tiny(cfg)
    fed = load(cfg.data, cfg.fed.clients, cfg.seed)
    tok = models.load_tokenizer(cfg.model)
    b = batches(encode(tok, fed.test.texts, 80), fed.test.labels, 64, tok.pad_token_id)
    # The frozen base is rebuilt from the same seed; the adapter brings LoRA and the trained head.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        base = models.load_base(cfg.model, tok, 4)
    loaded = PeftModel.from_pretrained(base, rundir.path / "adapter")
    acc = ClassifyTask(tok, fed.label_names, 80).evaluate(loaded, b, torch.device("cpu"))["accuracy"]
    assert acc == pytest.approx(json.loads((rundir.path / "summary.json").read_text())["final_test_accuracy"], abs=1e-6)
