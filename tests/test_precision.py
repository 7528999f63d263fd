"""train.precision: a bf16 frozen base under fp32 tunable parameters (precision.py).

- bf16 leaves every trainable parameter, its gradient and every optimizer state tensor fp32,
  while the frozen base weights are bf16, for every PEFT method;
- bf16 logits match fp32 logits of the same weights within a stated tolerance;
- the bytes on the wire are the same in fp32 and bf16 for every framework;
- ``fedtune run --set train.precision=bf16`` runs every framework, and the generate and sft tasks;
- ``auto`` is recorded in config.toml as fp32 or bf16; a bad value is a one-line error."""

from __future__ import annotations

import pytest
import torch

from conftest import run_tiny, tiny_config
from fedtune import cli, models, precision
from fedtune import config as configlib
from fedtune.config import ModelConfig
from fedtune.errors import FedtuneError
from fedtune.frameworks import FRAMEWORKS
from fedtune.frameworks.base import Context
from fedtune.training import make_optimizer, train_pass

# bf16 keeps 8 bits of mantissa: relative error per op ~2^-8. Through a 2-block tiny model the
# logits stay within this of fp32 (measured well below it).
LOGIT_TOLERANCE = 0.05


def bytes_on_wire(tmp_path, framework, prec):
    cfg = tiny_config(tmp_path / prec, framework=framework, fed__rounds=1, kd__client_eval_size=20,
                      data__test_size=40, split__split_layer=1, zo__steps=4, train__precision=prec)
    _, rundir = run_tiny(cfg)
    return [(r["bytes_down"], r["bytes_up"]) for r in rundir.metrics.records() if r["client"] != "server"]


def run_args(out, *keys):
    keys = ("model.name=tiny-gpt2", "data.max_labels=4", "data.private_size=60", "data.public_size=40",
            "data.test_size=40", "fed.clients=2", "fed.rounds=1", "train.threads=1", f"out={out}") + keys
    return ["run", "--quiet"] + [a for key in keys for a in ("--set", key)]


@pytest.mark.parametrize("peft", ["lora", "dora", "ia3", "prompt", "prefix"])
def test_bf16_keeps_tunable_grads_and_optimizer_state_fp32(tmp_path, peft):
    cfg = tiny_config(tmp_path, model__peft=peft, model__virtual_tokens=4, train__precision="bf16",
                      data__private_size=60)
    ctx = Context.build(cfg)
    tunable = [p for p in ctx.model.parameters() if p.requires_grad]
    frozen = [p for p in ctx.model.parameters() if not p.requires_grad]
    assert tunable and all(p.dtype == torch.float32 for p in tunable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    optimizer = make_optimizer(ctx.model, cfg.train)
    with precision.autocast("bf16", ctx.device):
        train_pass(ctx.model, ctx.client_batches(1, 0, limit=2), cfg.train, ctx.device, ctx.flops, ctx.task.loss,
                   optimizer=optimizer)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in tunable)
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert states and all(t.dtype == torch.float32 for t in states)
    assert all(t.dtype == torch.float32 for t in models.get_tunable(ctx.model).values())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
def test_bf16_logits_match_fp32(name):
    cfg = ModelConfig(name=name, lora_dropout=0.0, attn_implementation="eager")
    full, _ = models.build(cfg, 4, seed=0)
    half, _ = models.build(cfg, 4, seed=0, dtype=torch.bfloat16)
    # The same weights in both: the bf16 model's, in fp32.
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    full.eval(), half.eval()
    ids = torch.randint(0, 400, (3, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = full(input_ids=ids, attention_mask=mask).logits
        with precision.autocast("bf16", "cpu"):
            got = half(input_ids=ids, attention_mask=mask).logits.float()
    assert (got - ref).abs().max() <= LOGIT_TOLERANCE * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("framework", list(FRAMEWORKS.names))
def test_bytes_on_the_wire_do_not_change_with_precision(tmp_path, framework):
    full, half = bytes_on_wire(tmp_path, framework, "fp32"), bytes_on_wire(tmp_path, framework, "bf16")
    if not FRAMEWORKS.load(framework).per_batch:
        assert full == half
        return
    # Every tensor is the same; a per-batch reply's JSON header carries the batch's loss, whose
    # decimal digits differ with its value (safetensors pads the header to 8 bytes): one header
    # may differ by 8 bytes per message, 100 rows a client in batches of 16 = 7 replies each way.
    allowance = 8 * 2 * 7
    assert len(full) == len(half)
    assert all(abs(a - b) <= allowance for pair in zip(full, half) for a, b in zip(*pair))


@pytest.mark.parametrize("framework", list(FRAMEWORKS.names))
def test_cli_runs_every_framework_in_bf16(tmp_path, framework):
    out = tmp_path / "run"
    assert cli.main(run_args(out, f"framework={framework}", "kd.client_eval_size=20", "split.split_layer=1",
                             "zo.steps=4", "train.precision=bf16")) == 0
    saved = configlib.build_config(file=out / "config.toml")
    assert saved.train.precision == "bf16" and saved.model.attn_implementation == "eager"


@pytest.mark.parametrize("task", ["generate", "sft"])
def test_generation_tasks_run_in_bf16(tmp_path, task):
    from test_sft import arithmetic, write_jsonl

    kw = dict(train__task=task, model__name="tiny-llama", train__precision="bf16", fed__rounds=1,
              data__private_size=60, data__test_size=20, eval__max_new_tokens=4)
    if task == "sft":
        write_jsonl(tmp_path / "data/train.jsonl", arithmetic(40))
        write_jsonl(tmp_path / "data/test.jsonl", arithmetic(8, start=200))
        kw.update(data__path=str(tmp_path / "data"), data__public_size=0, data__private_size=0,
                  data__test_size=0, data__max_labels=0, data__max_length=48)
    summary, _ = run_tiny(tiny_config(tmp_path, **kw))
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0


def test_auto_is_recorded_as_the_choice(tmp_path):
    out = tmp_path / "run"
    assert cli.main(run_args(out, "train.precision=auto")) == 0
    saved = configlib.build_config(file=out / "config.toml")
    expected = "bf16" if precision.native_bf16(precision.device_type("auto")) else "fp32"
    assert saved.train.precision == expected
    assert saved.model.attn_implementation in ("sdpa", "eager")


def test_precision_values_and_the_bf16_alias():
    with pytest.raises(FedtuneError, match="train.precision must be one of auto, fp32, bf16"):
        configlib.build_config("demo", None, {"train.precision": "fp16"})
    assert configlib.build_config("demo", None, {"train.bf16": "true"}).train.precision == "bf16"
    assert configlib.build_config("demo", None, {"train.bf16": "false"}).train.precision == "fp32"
    assert "train.bf16" not in configlib.known_keys()


def _compiles() -> bool:
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
        return True
    except Exception:  # no compiler toolchain, or a platform torch.compile does not support
        return False


@pytest.mark.slow  # the compile alone takes a minute or more on a 2-core machine
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
def test_compiled_model_runs_and_matches_eager(tmp_path):
    if not _compiles():
        pytest.skip("torch.compile does not run here")
    kw = dict(fed__rounds=1, fed__clients=2, data__private_size=40, data__test_size=40, model__lora_dropout=0.0)
    eager, _ = run_tiny(tiny_config(tmp_path / "eager", **kw))
    compiled, _ = run_tiny(tiny_config(tmp_path / "compiled", train__compile=True, **kw))
    # The base's dropout draws other random numbers in compiled code: close, not equal.
    assert compiled["final_test_loss"] == pytest.approx(eager["final_test_loss"], rel=0.05)


def test_merged_export_writes_the_dtype_asked_for(tmp_path):
    from safetensors import safe_open

    _, rundir = run_tiny(tiny_config(tmp_path, fed__rounds=1, train__precision="bf16", data__private_size=40,
                                     data__test_size=20))
    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out = tmp_path / f"merged-{dtype}"
        assert cli.main(["export", str(rundir.path), "--merged", str(out), "--dtype", dtype]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {expected}
