"""Cutting a (LoRA-wrapped) sequence classifier or causal LM in two for split learning.

The client part is the embeddings and the first ``layer`` transformer blocks; the server part
is the remaining blocks, the final norm and the output head (the classifier, or the LM head
that the task applies at its answer positions: ``tasks.Task.from_hidden``). Both parts are *views*
of one shared model (``nn.ModuleList``s holding the same modules), so the frozen base exists
once and each part's tunable state (LoRA, head) is read and written with
``models.get_tunable/set_tunable`` on its view.

Each part runs the real Hugging Face modules (embeddings, blocks, norms, heads) with the
arguments their model's own ``forward`` would give them; what differs per architecture is
only the glue, in one small class per family below.

Prompt tuning (``model.peft = prompt``) sits on the client: its learned embeddings are prepended
to the token embeddings as PEFT's own forward does, and the mask the server gets covers them.

The activations cross the cut *packed*: only the real (attention-mask = 1) tokens, as an
(N_tokens, hidden) matrix. That is exact: with right padding a causal model's real tokens
never read the padded ones, an encoder masks them out as keys, and no head reads a padded
position, so the server may fill them with zeros and their gradient is zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import FedtuneError


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _output_head(hf: nn.Module) -> nn.Module:
    """The classifier's head, or a causal LM's vocabulary projection (frozen, often tied)."""
    return hf.get_output_embeddings() if is_causal_lm(hf) else hf.score


def is_causal_lm(hf: nn.Module) -> bool:
    return type(hf).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _last_token(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pool each row at its last real token, as the decoder classification heads do."""
    index = torch.arange(mask.shape[1], device=mask.device) * mask.to(torch.long)
    return logits[torch.arange(logits.shape[0], device=logits.device), index.argmax(-1)]


def _prepend(prompt: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    return embeds if prompt is None else torch.cat([prompt.to(embeds.dtype), embeds], dim=1)


class Glue:
    """How one architecture family embeds tokens, what its blocks take, and its head."""

    blocks: nn.ModuleList
    client_modules: list[nn.Module]  # besides the blocks
    server_modules: list[nn.Module]
    generates = True  # whether it also splits the family's causal LM (train.task=generate)

    def __init__(self, hf: nn.Module):
        self.hf = hf

    def embed(self, input_ids: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states entering block 0; ``prompt`` (batch, n, hidden) goes before the tokens."""
        raise NotImplementedError

    def block_kwargs(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict:
        raise NotImplementedError

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden states: what a causal LM's head reads."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The classifier's logits from the last block's output."""
        raise NotImplementedError


class GPT2Glue(Glue):
    def __init__(self, hf):
        super().__init__(hf)
        t = hf.transformer
        self.blocks = t.h
        self.client_modules = [t.wte, t.wpe, t.drop]
        self.server_modules = [t.ln_f, _output_head(hf)]

    def embed(self, input_ids, prompt=None):
        t = self.hf.transformer
        hidden = _prepend(prompt, t.wte(input_ids))
        return t.drop(hidden + t.wpe(_positions(hidden)))

    def block_kwargs(self, hidden, mask):
        from transformers.masking_utils import create_causal_mask

        pos = _positions(hidden)
        causal = create_causal_mask(
            config=self.hf.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=None, position_ids=pos
        )
        return dict(attention_mask=causal, position_ids=pos)

    def norm(self, hidden):
        return self.hf.transformer.ln_f(hidden)

    def head(self, hidden, mask):
        return _last_token(self.hf.score(self.norm(hidden)), mask)


class LlamaGlue(Glue):
    def __init__(self, hf):
        super().__init__(hf)
        m = hf.model
        self.blocks = m.layers
        self.client_modules = [m.embed_tokens]
        # The rotary table has no weights; the server recomputes it from the positions.
        self.server_modules = [m.norm, _output_head(hf)]

    def embed(self, input_ids, prompt=None):
        return _prepend(prompt, self.hf.model.embed_tokens(input_ids))

    def block_kwargs(self, hidden, mask):
        from transformers.masking_utils import create_causal_mask

        pos = _positions(hidden)
        causal = create_causal_mask(
            config=self.hf.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=None, position_ids=pos
        )
        rotary = self.hf.model.rotary_emb(hidden, position_ids=pos)
        return dict(attention_mask=causal, position_ids=pos, position_embeddings=rotary)

    def norm(self, hidden):
        return self.hf.model.norm(hidden)

    def head(self, hidden, mask):
        return _last_token(self.hf.score(self.norm(hidden)), mask)


class BertGlue(Glue):
    generates = False  # an encoder (bidirectional mask): no causal LM to split

    def __init__(self, hf):
        super().__init__(hf)
        b = hf.bert
        if b.pooler is None:
            raise FedtuneError("split learning needs BERT's pooler for the classification head")
        self.blocks = b.encoder.layer
        self.client_modules = [b.embeddings]
        self.server_modules = [b.pooler, hf.dropout, hf.classifier]

    def embed(self, input_ids, prompt=None):
        e = self.hf.bert.embeddings
        if prompt is None:
            return e(input_ids=input_ids)
        return e(inputs_embeds=_prepend(prompt, e.word_embeddings(input_ids)))

    def block_kwargs(self, hidden, mask):
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.hf.config, inputs_embeds=hidden, attention_mask=mask)
        return dict(attention_mask=mask)

    def head(self, hidden, mask):
        return self.hf.classifier(self.hf.dropout(self.hf.bert.pooler(hidden)))


# model_type -> glue, for the sequence-classification and causal LM models models.build makes.
GLUES: dict[str, type[Glue]] = {"gpt2": GPT2Glue, "llama": LlamaGlue, "bert": BertGlue}


class CutModel:
    """A model cut after ``layer`` blocks: ``client`` and ``server`` are views of it.
    ``server_blocks`` (default: the model's blocks from ``layer`` on) are the blocks the server
    runs; clients with different cuts give the server its own copies of the blocks some clients
    hold (framework.py)."""

    def __init__(self, model: nn.Module, layer: int, server_blocks: list[nn.Module] | None = None):
        hf = hf_model(model)
        model_type = hf.config.model_type
        if model_type not in GLUES:
            raise FedtuneError(
                f"split learning cannot split a {model_type!r} model; supported architectures: {', '.join(GLUES)}"
            )
        self.causal_lm = is_causal_lm(hf)
        if not (self.causal_lm or type(hf).__name__.endswith("ForSequenceClassification")):
            raise FedtuneError(f"split learning needs a sequence classifier or a causal LM; got {type(hf).__name__}")
        if self.causal_lm and not GLUES[model_type].generates:
            generating = ", ".join(k for k, g in GLUES.items() if g.generates)
            raise FedtuneError(
                f"split learning with train.task=generate supports {generating}; got a {model_type!r} model"
            )
        self.model, self.glue, self.layer = model, GLUES[model_type](hf), layer
        n = len(self.glue.blocks)
        if not 1 <= layer <= n - 1:
            raise FedtuneError(f"split.split_layer must be in 1..{n - 1} for this {n}-block model; got {layer}")
        self.num_blocks = n
        peft = getattr(model, "peft_config", {}).get("default")
        prompt = getattr(getattr(peft, "peft_type", None), "value", "") == "PROMPT_TUNING"
        self.prompt = model.prompt_encoder["default"] if prompt else None
        self.client = nn.ModuleList([*self.glue.client_modules, *self.glue.blocks[:layer],
                                     *([self.prompt] if prompt else [])])
        self.server_blocks = nn.ModuleList(self.glue.blocks[layer:] if server_blocks is None else server_blocks)
        self.server = nn.ModuleList([*self.server_blocks, *self.glue.server_modules])
        placed = (self.client, self.glue.blocks[layer:], self.server)  # the model's own blocks, copies or not
        parts = {id(p) for part in placed for p in part.parameters() if p.requires_grad}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in parts]
        if stray:
            raise FedtuneError(f"split learning cannot place the tunable parameter {stray[0]} on client or server")

    def full_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask over what crosses the cut: the prompt's tokens, then the input's."""
        if self.prompt is None:
            return mask
        n = self.prompt.embedding.num_embeddings
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)

    def client_forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-> the packed activations at the cut, (real tokens, hidden)."""
        return self.client_hidden(input_ids, mask)[self.full_mask(mask).bool()]

    def client_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-> the activations at the cut, padded: (rows, prompt + width, hidden)."""
        prompt = None
        if self.prompt is not None:
            n = self.prompt.embedding.num_embeddings
            prompt = self.prompt(torch.arange(n, device=input_ids.device)).expand(input_ids.shape[0], -1, -1)
        hidden = self.glue.embed(input_ids, prompt)
        mask = self.full_mask(mask)
        kwargs = self.glue.block_kwargs(hidden, mask)
        for block in self.glue.blocks[: self.layer]:
            hidden = block(hidden, **kwargs)
        return hidden

    def server_forward(self, packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Packed activations -> a classifier's logits (batch, labels), or a causal LM's final
        hidden states (batch, length, hidden), which the task's ``from_hidden`` turns into logits."""
        hidden = packed.new_zeros(*mask.shape, packed.shape[-1])
        hidden[mask.bool()] = packed
        kwargs = self.glue.block_kwargs(hidden, mask)
        for block in self.server_blocks:
            hidden = block(hidden, **kwargs)
        return self.glue.norm(hidden) if self.causal_lm else self.glue.head(hidden, mask)
