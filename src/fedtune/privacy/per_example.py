"""DP-SGD's per-example gradients, ``privacy.per_example``: ``vmap`` computes every example's
gradient of the tunable parameters in one batched pass (torch.func: ``vmap(grad(loss))`` over
``functional_call``, the frozen weights closed over); ``loop`` takes one backward pass per
example and is the oracle the fast path is tested against.

Under vmap each example is its row of the padded batch with its attention mask; the tasks'
losses read only the real tokens (right padding, masked attention, pooling at the last real
token), so a padded row's loss is the loss of the row cut to its tokens. PEFT methods that
learn virtual tokens replace the ids by embeddings, which hides the padding from a
classification head, so their rows go through in groups of equal length instead. Where a model's
forward cannot run under vmap (data-dependent Python control flow), the loop takes over and
the run logs one line."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

grad_of = grad  # vmap_cut_grads has an argument named grad

from ..data import Batch

log = logging.getLogger("fedtune")
Stacked = list[torch.Tensor | None]  # per parameter: (examples, *shape)


class _Loss(nn.Module):
    """The loss of one example as a module call, so functional_call can swap the parameters."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, ids, mask, labels, index):
        return self.loss_fn(self.model, Batch(ids[None], mask[None], labels[None], index[None]))


@contextlib.contextmanager
def explicit_masks():
    """transformers skips building an attention mask when it reads that the padding mask is all
    ones, a data-dependent branch vmap cannot take; always building it is the same function."""
    try:
        from transformers import masking_utils
    except ImportError:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
        return
    names = [n for n in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa") if hasattr(masking_utils, n)]
    skips = {n: getattr(masking_utils, n) for n in names}
    for n in names:
        setattr(masking_utils, n, lambda *args, **kwargs: False)
    try:  # the math kernel is plain tensor ops, which vmap batches (the fused kernels it runs one by one)
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for n, f in skips.items():
            setattr(masking_utils, n, f)


def names_of(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return ["model." + by_id[id(p)] for p in params]


def vmap_grads(model: nn.Module, params: list[nn.Parameter], loss_fn, batch: Batch,
               equal_lengths: bool = False) -> tuple[Stacked, list[float]]:
    """-> (each parameter's per-example gradients stacked on dim 0, each example's loss).
    ``equal_lengths``: rows of equal length go through together, cut to their tokens (PEFT's
    prompt tuning pools a classification head at the last position whatever the mask, so a
    padded row's loss is not its own)."""
    if not equal_lengths:
        return _vmap_rows(model, params, loss_fn, batch)
    widths = batch.attention_mask.sum(1).clamp_min(1)
    stacked: Stacked = [None] * len(params)
    losses = [0.0] * len(widths)
    for w in widths.unique().tolist():
        rows = torch.nonzero(widths == w).flatten()
        part = Batch(batch.input_ids[rows, :w], batch.attention_mask[rows, :w], batch.labels[rows], batch.index[rows])
        grads, part_losses = _vmap_rows(model, params, loss_fn, part)
        for i, g in enumerate(grads):
            if g is not None:
                if stacked[i] is None:
                    stacked[i] = g.new_zeros((len(widths), *g.shape[1:]))
                stacked[i][rows] = g
        for r, loss in zip(rows.tolist(), part_losses):
            losses[r] = loss
    return stacked, losses


def _vmap_rows(model, params, loss_fn, batch: Batch) -> tuple[Stacked, list[float]]:
    wrapper = _Loss(model, loss_fn)
    names = names_of(model, params)
    detached = {n: p.detach() for n, p in zip(names, params)}

    def one(tunable, ids, mask, labels, index):
        loss = functional_call(wrapper, tunable, (ids, mask, labels, index), strict=False)
        return loss, loss.detach()

    with explicit_masks():
        grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0, 0, 0), randomness="different")(
            detached, batch.input_ids, batch.attention_mask, batch.labels, batch.index)
    return [grads[n] for n in names], losses.tolist()


class _Cut(nn.Module):
    """split's client part as a module call returning one example's padded activations."""

    def __init__(self, part):
        super().__init__()
        self.client, self.part = part.client, [part]  # a list: the part is no module

    def forward(self, ids, mask):
        return self.part[0].client_hidden(ids[None], mask[None])[0]


def vmap_cut_grads(part, params: list[nn.Parameter], input_ids, mask, grad: torch.Tensor, scale: float) -> Stacked:
    """split's client part: each example's gradient of <its activations at the cut, ``scale`` x
    the gradient the server returned for them>; ``grad`` is packed as the activations were sent
    (real tokens, example after example: ``part.full_mask`` says where they sit)."""
    wrapper = _Cut(part)
    by_id = {id(p): n for n, p in wrapper.named_parameters()}
    names = [by_id[id(p)] for p in params]
    full = part.full_mask(mask).bool()
    padded = grad.new_zeros((*full.shape, grad.shape[-1]))
    padded[full] = grad * scale
    detached = {n: p.detach() for n, p in zip(names, params)}

    def one(tunable, ids, m, g):
        return (functional_call(wrapper, tunable, (ids, m), strict=False) * g).sum()

    with explicit_masks():
        grads = vmap(grad_of(one), in_dims=(None, 0, 0, 0), randomness="different")(detached, input_ids, mask, padded)
    return [grads[n] for n in names]


def clipped_sum(stacked: Stacked, clip: float) -> Stacked:
    """The sum over examples of each example's gradients scaled together to L2 norm <= clip."""
    present = [g for g in stacked if g is not None]
    sq = sum(g.double().flatten(1).pow(2).sum(1) for g in present)
    factor = (clip / torch.sqrt(sq).clamp_min(1e-12)).clamp(max=1.0)
    return [None if g is None else torch.einsum("b,b...->...", factor.to(g.dtype), g) for g in stacked]


def fallback_note(err: Exception) -> None:
    log.warning("privacy.per_example=vmap: this model's forward does not run under vmap (%s); "
                "using the per-example loop", str(err).splitlines()[0][:120])
