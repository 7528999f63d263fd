"""Split-FedLLM: the split step is the unsplit step (classify and generate), it learns, its bytes
are the serialized messages, compression shrinks them, and bad cuts fail clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import run_tiny, tiny_config
from test_tasks import short_data  # noqa: F401 (a fixture: the one-token-intent data set)
from torch import nn

from fedtune import compression, models
from fedtune.errors import FedtuneError
from fedtune.frameworks.base import Context
from fedtune.frameworks.split import SplitFramework
from fedtune.wire import deserialize, serialize
from fedtune.runtimes.rounds import MeteredLink
from fedtune.frameworks.split.cut import CutModel
from fedtune.training import make_optimizer


class Harness:
    """A split framework whose model has no dropout and non-zero LoRA B (so every LoRA
    matrix gets a gradient in the first step); ``step`` runs one client's round from the
    same starting state through a metered link that keeps every blob it carries."""

    def __init__(self, tmp_path, model, task="classify"):
        cfg = tiny_config(tmp_path, model__name=model, model__lora_dropout=0.0, framework="split",
                          split__split_layer=1, train__task=task)
        self.ctx = ctx = Context.build(cfg)
        for m in ctx.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            for name, p in ctx.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        self.start = models.get_tunable(ctx.model)
        self.fw = SplitFramework(ctx)

    def step(self, samples=16, act_dtype="fp32", act_topk=0.0):
        fw, cfg = self.fw, self.fw.cfg
        models.set_tunable(self.ctx.model, self.start)
        fw.client_global = models.get_tunable(fw.split.client)
        fw.server_opt = make_optimizer(fw.split.server, cfg.train)
        fw.server_meter = dict.fromkeys(fw.server_meter, 0)
        cfg.split.samples_per_round, cfg.split.act_dtype, cfg.split.act_topk = samples, act_dtype, act_topk
        blobs = []

        def transport(blob):
            reply = serialize(fw.serve(1, 0, deserialize(blob)))
            blobs.append((blob, reply))
            return reply

        link = MeteredLink(transport)
        result = fw.fit(1, 0, fw.configure(1, 0), None, link)
        return result, link, blobs


    @torch.no_grad()
    def activations(self) -> torch.Tensor:
        """The client's exact packed activations for the first batch of ``step()``."""
        models.set_tunable(self.ctx.model, self.start)
        (batch,) = self.ctx.client_batches(1, 0, 0, limit=16)
        return self.fw.split.client_forward(batch.input_ids, batch.attention_mask)


_harnesses = {}


def harness(tmp_path_factory, model="tiny-gpt2", task="classify") -> Harness:
    if (model, task) not in _harnesses:  # one context per model and task for the whole module
        _harnesses[model, task] = Harness(tmp_path_factory.mktemp(model), model, task)
    return _harnesses[model, task]


@pytest.mark.parametrize("task", ["classify", "generate"])
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_split_step_equals_unsplit_step(tmp_path_factory, model, task):
    h = harness(tmp_path_factory, model, task)
    ctx, start = h.ctx, h.start
    result, _, blobs = h.step(samples=16)
    assert result.metrics["batches"] == 1 and result.metrics["num_samples"] == 16 and len(blobs) == 1
    split_after = models.get_tunable(ctx.model)

    models.set_tunable(ctx.model, start)
    (batch,) = ctx.client_batches(1, 0, 0, limit=16)
    ctx.model.train()
    optimizer = make_optimizer(ctx.model, h.fw.cfg.train)
    optimizer.zero_grad(set_to_none=True)  # the split step left its gradients on the shared model
    loss = ctx.task.loss(ctx.model, batch)
    loss.backward()
    optimizer.step()
    unsplit_after = models.get_tunable(ctx.model)

    assert split_after.keys() == unsplit_after.keys()
    moved = max((unsplit_after[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-4  # the step did something
    diff = max((split_after[n] - unsplit_after[n]).abs().max().item() for n in start)
    assert diff <= 1e-5, diff
    assert result.metrics["train_loss"] == pytest.approx(loss.item(), abs=1e-5)
    # The client counts its blocks only, the server the rest (under generate the vocabulary
    # projection at the answer tokens only): together, the whole step.
    full = ctx.task.flops(ctx.flops, batch, train=True)
    assert 0 < result.metrics["client_flops"] < full
    assert result.metrics["client_flops"] + h.fw.server_meter["server_flops"] == full


def test_split_learns_and_bytes_add_up(tmp_path):
    cfg = tiny_config(tmp_path, framework="split", split__split_layer=1, fed__rounds=3)
    summary, rundir = run_tiny(cfg)
    assert summary["final_test_accuracy"] > 0.45  # chance is 0.25
    records = rundir.metrics.records()
    clients = [r for r in records if r["client"] != "server"]
    servers = [r for r in records if r["client"] == "server"]
    assert len(clients) == 9 and len(servers) == 3
    for r in clients:
        assert r["bytes_up"] == r["adapter_bytes_up"] + r["bytes_up_link"]
        assert r["bytes_down"] == r["adapter_bytes_down"] + r["bytes_down_link"]
        # Each token's activation crosses once up and its gradient once down (fp32, hidden 64).
        assert r["bytes_up_link"] > r["num_samples"] * 4 * 64 * 4
    for s in servers:
        assert s["server_flops"] > 0 and s["server_train_seconds"] > 0 and s["server_train_samples"] == 300


def test_split_generate_learns(tmp_path, short_data):  # noqa: F811
    # test_tasks.py's generate settings, cut after the first block. Its random tiny GPT-2 learns
    # slowly (frozen output layer tied to 0.02-scale embeddings), split more slowly than FedAvg
    # (measured test loss: untrained 10.80, after rounds 1 and 2: 10.23, 10.19; exact match 0%).
    cfg = tiny_config(tmp_path, framework="split", split__split_layer=1, train__task="generate",
                      data__path=str(short_data), data__max_labels=0, train__lr=0.02, fed__rounds=2,
                      data__private_size=150, data__test_size=100)
    summary, rundir = run_tiny(cfg)
    server = [r for r in rundir.metrics.records() if r["client"] == "server"]
    ctx = Context.build(cfg)
    batches = ctx.test_batches()
    untrained = ctx.task.evaluate(ctx.model, batches, ctx.device)["loss"]
    assert server[-1]["test_loss"] < server[0]["test_loss"] < untrained - 0.3
    # The checkpoint's split state rebuilds the evaluated model (server part + global client part).
    fw = SplitFramework(ctx)
    fw.load_state_dict(rundir.load_checkpoint()["framework"])
    final = ctx.task.evaluate(fw.global_model(), batches, ctx.device)["loss"]
    assert final == pytest.approx(server[-1]["test_loss"], abs=1e-4)


def test_link_bytes_are_the_serialized_messages(tmp_path_factory):
    _, link, blobs = harness(tmp_path_factory).step(samples=40)  # 3 batches
    assert len(blobs) == 3
    assert link.bytes_up == sum(len(up) for up, _ in blobs)
    assert link.bytes_down == sum(len(down) for _, down in blobs)
    for up, down in blobs:
        msg, reply = deserialize(up), deserialize(down)
        tokens = int(msg.tensors["mask"].sum())
        assert msg.tensors["act.values"].shape == (tokens, 64)  # packed: real tokens only
        assert reply.tensors["grad.values"].shape == (tokens, 64)
        assert len(up) == len(serialize(msg)) and len(down) == len(serialize(reply))


def _gradient(up, down) -> torch.Tensor:
    """The activation gradient the client applies, densified."""
    grad = compression.dequantize(down, "grad.")
    if "act.index" in up:
        width = int(up["act.width"][0])
        return torch.zeros(grad.shape[0], width).scatter_(-1, up["act.index"].long(), grad)
    return grad


def test_compression_shrinks_activations(tmp_path_factory):
    h = harness(tmp_path_factory)
    result, link, blobs = h.step()
    dense_bytes = link.bytes_up + link.bytes_down
    up, down = (deserialize(b).tensors for b in blobs[0])
    dense_grad, dense_loss = _gradient(up, down), result.metrics["train_loss"]
    cases = [("fp16", 0.0, 0.55, 0.9999), ("bf16", 0.0, 0.55, 0.999), ("int8", 0.0, 0.35, 0.999),
             ("fp32", 0.25, 0.45, 0.3), ("int8", 0.25, 0.25, 0.3)]
    for dtype, topk, max_ratio, min_cosine in cases:
        result, link, blobs = h.step(act_dtype=dtype, act_topk=topk)
        assert link.bytes_up + link.bytes_down < max_ratio * dense_bytes, (dtype, topk)
        up, down = (deserialize(b).tensors for b in blobs[0])
        if topk:  # each token's 16 largest-magnitude values, and a gradient only for those
            assert up["act.index"].shape[-1] == 16 and down["grad.values"].shape[-1] == 16
            exact = h.activations()
            kept = exact.gather(-1, up["act.index"].long()).abs()
            assert (kept >= exact.abs().topk(16, -1).values[:, -1:]).all()
        grad = _gradient(up, down)
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), dense_grad.flatten(), dim=0).item()
        assert cosine > min_cosine, (dtype, topk, cosine)
        if not topk:
            assert result.metrics["train_loss"] == pytest.approx(dense_loss, abs=0.02)


def test_bad_split_layer_and_architecture():
    model, _ = models.build(models.ModelConfig(name="tiny-gpt2"), 4, 0)
    for layer in (0, 2, 5):
        with pytest.raises(FedtuneError, match=r"split.split_layer must be in 1\.\.1 .*got " + str(layer)):
            CutModel(model, layer)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    other = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("distilbert", n_layers=2, dim=32, hidden_dim=64, n_heads=2, vocab_size=100)
    )
    with pytest.raises(FedtuneError, match="cannot split a 'distilbert' model; supported architectures: gpt2"):
        CutModel(other, 1)
    bert, _ = models.build(models.ModelConfig(name="tiny-bert"), 4, 0, "generate")
    with pytest.raises(FedtuneError, match="train.task=generate supports gpt2, llama; got a 'bert' model"):
        CutModel(bert, 1)
    with pytest.raises(FedtuneError, match="act_topk"):
        tiny_config(split__act_topk=1.5)
