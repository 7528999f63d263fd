"""One battery over every registered PEFT method (``ADAPTERS.names``), crossed with the frameworks
by declared traits (split's cut takes the ``split_cut`` methods; ``rank`` methods also run with
clients of different ranks where the framework declares ``client_ranks``), on the tiny random
models:

- bytes counted in the records equal the bytes of the messages serialized (counted by
  test_frameworks' grid), and a weight upload is exactly the serialized tunable state;
- a run killed mid-round and resumed ends with the same records, under fedavg and (for the
  ``split_cut`` methods) split, whose client part holds the method;
- the analytic FLOPs of a training step match torch's FlopCounterMode (test_metering's 5%);
- what the method's class says matches its traits (``rank``: LoRA factors; ``merge``: export
  folds it into a plain model that computes the same logits)."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import tiny_config
from fedtune import models
from fedtune.adapters import ADAPTERS
from fedtune.config import ModelConfig
from fedtune.console import Progress
from fedtune.frameworks import FRAMEWORKS, get
from fedtune.frameworks.base import Context
from fedtune.rundir import RunDir
from fedtune.runtimes.rounds import run_rounds
from fedtune.strategies import STRATEGIES
from fedtune.wire import Message, serialize
from test_frameworks import CountingGrid
from test_metering import measure_flops

RANKS = [1, 2, 4]  # one per client (the tiny config has three)


@functools.cache
def runs_here(peft: str) -> bool:
    """Whether the installed peft and transformers run the method's forward at all."""
    model, _ = models.build(ModelConfig(name="tiny-gpt2", peft=peft, virtual_tokens=2), 2, seed=0)
    try:
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))
    except ValueError:  # prefix tuning, where the model's cache API and peft's disagree
        return False
    return True


def need(peft: str) -> None:
    if not runs_here(peft):
        pytest.skip(f"model.peft={peft}: its forward fails with the installed peft/transformers (test_metering too)")


def cases():
    for peft in ADAPTERS.names:
        for fw in FRAMEWORKS.names:
            if FRAMEWORKS.has(fw, "split_cut") and not ADAPTERS.has(peft, "split_cut"):
                continue
            yield pytest.param(peft, fw, (), id=f"{peft}-{fw}")
            if ADAPTERS.has(peft, "rank") and FRAMEWORKS.has(fw, "client_ranks"):
                yield pytest.param(peft, fw, tuple(RANKS), id=f"{peft}-{fw}-ranks")


def small(tmp_path, peft, framework, ranks):
    keys = dict(framework=framework, model__peft=peft, model__virtual_tokens=4, fed__rounds=1,
                data__private_size=90, data__public_size=40, data__test_size=40, data__max_length=32,
                kd__client_eval_size=20, split__split_layer=1, zo__steps=4)
    if ranks:
        keys["model__client_ranks"] = list(ranks)
        if FRAMEWORKS.has(framework, "uploads_weights"):  # different ranks are aggregated
            keys["fed__strategy"] = STRATEGIES.having("rank_aware")[0]
    return tiny_config(tmp_path, **keys)


@pytest.mark.parametrize("peft, framework, ranks", list(cases()))
def test_bytes_counted_equal_the_serialized_messages(tmp_path, peft, framework, ranks):
    need(peft)
    cfg = small(tmp_path, peft, framework, ranks)
    fw = get(framework)(Context.build(cfg))
    grid = CountingGrid(fw, Progress())
    rundir = RunDir.create(cfg)
    run_rounds(fw, grid, rundir)
    clients = [r for r in rundir.metrics.records() if r["client"] != "server"]
    assert len(clients) == cfg.fed.clients
    for r in clients:
        assert (r["bytes_down"], r["bytes_up"]) == tuple(grid.sent[r["round"], r["client"]])
    if FRAMEWORKS.has(framework, "uploads_weights") and not fw.per_batch and not ranks:
        # the whole upload is the tunable state: every trainable tensor of the method and the head
        state = models.get_tunable(fw.ctx.model)
        assert {r["bytes_up"] for r in clients} == {len(serialize(Message(state)))}


def resume_cases():
    for peft in ADAPTERS.names:
        for fw in ("fedavg", "split"):
            if not FRAMEWORKS.has(fw, "split_cut") or ADAPTERS.has(peft, "split_cut"):
                yield pytest.param(peft, fw, id=f"{peft}-{fw}")


@pytest.mark.parametrize("peft, framework", list(resume_cases()))
def test_killed_and_resumed_run_ends_with_the_same_records(tmp_path, peft, framework):
    from test_frameworks import assert_resume_matches

    need(peft)
    assert_resume_matches(tmp_path, framework=framework, model__peft=peft, model__virtual_tokens=4,
                          data__private_size=90, data__test_size=40, data__max_length=32, split__split_layer=1,
                          fed__rounds=2)


def flops(name: str, peft: str, train: bool) -> tuple[int, int]:
    """-> (measured, analytic) FLOPs of one batch, forward (and backward if train)."""
    return measure_flops(dict(name=name, peft=peft, virtual_tokens=6, attn_implementation="eager", lora_dropout=0.0),
                         train)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("peft", ADAPTERS.names)
def test_analytic_training_flops_match_flop_counter(name, peft):
    need(peft)
    measured, analytic = flops(name, peft, train=True)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


@pytest.mark.parametrize("peft", ADAPTERS.names)
def test_the_class_says_what_the_traits_say(peft):
    need(peft)
    cls = ADAPTERS.load(peft)
    model, _ = models.build(ModelConfig(name="tiny-gpt2", peft=peft, virtual_tokens=4), 3, seed=0)
    names = models.tunable_names(model)
    assert cls.ranked == ADAPTERS.has(peft, "rank") == any(".lora_A." in n for n in names)
    with torch.no_grad():  # move every tunable tensor off its init, so a merge has something to fold
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        merged = models.merged_model(model)
        assert (not hasattr(merged, "peft_config")) == ADAPTERS.has(peft, "merge")
        if ADAPTERS.has(peft, "merge"):
            torch.testing.assert_close(merged(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, logits,
                                       rtol=1e-4, atol=1e-5)
