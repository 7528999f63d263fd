import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedtune import models
from fedtune.config import ModelConfig
from fedtune.metering import FlopModel
from fedtune.wire import Message, deserialize, payload_bytes, serialize


def test_serialized_bytes_are_the_tensors_plus_a_small_header():
    msg = Message({"a": torch.randn(300, 8), "b": torch.zeros(8, 768, dtype=torch.float16)}, {"round": 3})
    blob = serialize(msg)
    header = int.from_bytes(blob[:8], "little")
    assert len(blob) == 8 + header + payload_bytes(msg.tensors)
    assert payload_bytes(msg.tensors) == 300 * 8 * 4 + 8 * 768 * 2
    back = deserialize(blob)
    assert back.meta == {"round": 3}
    assert torch.equal(back.tensors["a"], msg.tensors["a"]) and back.tensors["b"].dtype == torch.float16


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("train", [False, True])
def test_analytic_flops_match_flop_counter(name, train):
    model, _ = models.build(ModelConfig(name=name, attn_implementation="eager", lora_dropout=0.0), 77, seed=0)
    batch, length = 8, 37
    ids = torch.randint(3, 1000, (batch, length))
    mask = torch.ones_like(ids)
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, attention_mask=mask, labels=torch.zeros(batch, dtype=torch.long))
        if train:
            out.loss.backward()
    measured = counter.get_total_flops()
    analytic = FlopModel.of(model).count(batch, length, train=train)
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)  # the README states 2%


PEFT_CASES = {
    "dora": dict(peft="dora"),
    "dora-dropout": dict(peft="dora", lora_dropout=0.1),  # x W recomputed on the dropped-out input
    "ia3": dict(peft="ia3"),
    "prompt": dict(peft="prompt", virtual_tokens=6),  # attention over L + 6 tokens
    "prefix": dict(peft="prefix", virtual_tokens=6),  # L queries x (L + 6) keys
    "ffa-lora": dict(lora_freeze_a=True),  # no gradient for A
}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("train", [False, True])
def test_analytic_flops_match_flop_counter_for_every_peft_method(name, case, train):
    measured, analytic = measure_flops(dict(name=name, attn_implementation="eager", lora_dropout=0.0)
                                       | PEFT_CASES[case], train)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def measure_flops(model_keys: dict, train: bool) -> tuple[int, int]:
    """-> (FlopCounterMode's, the analytic) FLOPs of one batch of 8 x 37 tokens, forward (and
    backward if ``train``), on the model ``model_keys`` builds."""
    model, _ = models.build(ModelConfig(**model_keys), 77, seed=0)
    model.train(train)
    batch, length = 8, 37
    ids = torch.randint(3, 1000, (batch, length))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(batch, dtype=torch.long))
        if train:
            out.loss.backward()
    return counter.get_total_flops(), FlopModel.of(model).count(batch, length, train=train)


def test_flops_grow_with_rank_and_length():
    small = FlopModel.of(models.build(ModelConfig(name="tiny-gpt2", lora_r=1), 4, 0)[0])
    big = FlopModel.of(models.build(ModelConfig(name="tiny-gpt2", lora_r=16), 4, 0)[0])
    assert big.count(8, 40, True) > small.count(8, 40, True)
    assert small.count(8, 80, True) > 2 * small.count(8, 40, True) * 0.99
