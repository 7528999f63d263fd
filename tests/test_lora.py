"""PEFT methods, FFA-LoRA, rsLoRA, heterogeneous and dynamic LoRA ranks (docs/peft.md)."""

from __future__ import annotations

import pytest
import torch

from fedtune import models
from fedtune.config import ModelConfig
from fedtune.errors import FedtuneError
from fedtune.model_cut import CutModel

from conftest import run_tiny, tiny_config


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_split_prompt_tuning_computes_what_peft_computes(name):
    model, _ = models.build(ModelConfig(name=name, peft="prompt", virtual_tokens=4), 5, seed=0)
    model.eval()
    ids = torch.randint(3, 1000, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        cut = CutModel(model, 1)
        packed = cut.client_forward(ids, mask)
        assert packed.shape[0] == 3 * (9 + 4)  # the prompt's tokens cross the cut
        split = cut.server_forward(packed, cut.full_mask(mask))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert any(p is cut.prompt.embedding.weight for p in cut.client.parameters() if p.requires_grad)
