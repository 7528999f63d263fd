"""A client's round of split training (``SplitFramework.fit``). Per batch, the step's phases:

    forward_to_cut     c1: the client part's forward -> packed activations
    send_activations   c2: encode them (a codec, or the round's traffic budget) and send
    (the server step)  c3, c4: ``SplitFramework.serve`` over the link
    receive_gradient   the activations' gradient, decoded in the layout they were sent in
    backward           c5: backpropagate it through the client part (DP-SGD: per example), step
"""

from __future__ import annotations

import math

import torch

from ... import models
from ...data import Batch
from ...metrics import MB
from ...privacy import per_example
from ...privacy.guard import ClientGuard
from ...strategies.base import with_extras
from ...training import autocast, make_optimizer
from ...wire import Message, serialize
from ..base import ClientResult
from . import codecs, plan
from .codecs import ACT, GRAD

LOSS = "loss.rows"  # split.sample = loss: each row's loss, sent back with the gradient


class ClientRound:
    """One client's round: what it holds (its part, optimizer, privacy, budget, loss scores)
    and what it has done (FLOPs, steps, the current epoch's losses)."""

    def __init__(self, fw, rnd: int, cid: int, msg: Message, state: dict | None, own):
        self.fw, self.rnd, self.cid, self.down, self.own = fw, rnd, cid, msg, own
        ctx, train, s = fw.ctx, fw.cfg.train, fw.cfg.split
        rows = len(own)
        self.part = fw.parts[fw.cuts[cid]]
        self.tunable, self.rule = fw.local_rule(msg, state)
        models.set_tunable(self.part.client, self.tunable)  # cc4
        self.optimizer = make_optimizer(self.part.client, train)
        self.guard = ClientGuard(fw.cfg, cid, rows, state)
        self.dp = self.guard.dp
        self.params = [p for p in self.part.client.parameters() if p.requires_grad]
        self.scores = None  # split.sample=loss: each row's last reported loss (NaN: never sent)
        if s.sample == "loss":
            self.scores = (state or {}).get("split_loss", torch.full((rows,), math.nan)).clone()
        self.budget = codecs.Budget(s.act_budget_mb * MB, train.local_epochs * plan.batches_per_round(
            rows, s.samples_per_round, train.batch_size, 1)) if s.act_budget_mb else None
        self.codec = codecs.for_config(s)
        self.flops, self.step, self.samples, self.losses = 0, 0, 0, []

    def epoch(self, epoch: int, link) -> None:
        fw, ctx = self.fw, self.fw.ctx
        batches = (fw.loss_batches(self.rnd, self.cid, epoch, self.scores, self.own) if self.scores is not None
                   else ctx.client_batches(self.rnd, self.cid, epoch, fw.cfg.split.samples_per_round, self.own))
        self.losses = []
        for batch in batches:
            self.train_step(batch.to(ctx.device), link)
            if ctx.on_step:
                ctx.on_step(len(self.losses), len(batches))
        self.samples = max(self.samples, sum(len(b.index) for b in batches))

    def train_step(self, batch: Batch, link) -> None:
        if not len(batch.index):  # DP-SGD's Poisson draw came up empty: a step of noise alone
            self.optimizer.zero_grad(set_to_none=True)
            self.dp.step_stacked(self.params, [None] * len(self.params), 0)
            self.optimizer.step()
            self.step += 1
            return
        packed, mask = self.forward_to_cut(batch)
        up = self.send_activations(packed, mask, batch)
        reply = link.exchange(up)  # c3, c4: the server's step
        grad = self.receive_gradient(reply, up, batch)
        self.backward(packed, grad.to(self.fw.ctx.device), mask, batch)
        self.losses.append(reply.meta["loss"])
        self.flops += self.fw.ctx.flops.count(*batch.shape, train=True, blocks=range(0, self.part.layer), head=False)
        self.step += 1

    def forward_to_cut(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # c1
        self.part.client.train()
        with autocast(self.fw.cfg.train, self.fw.ctx.device):
            packed = self.part.client_forward(batch.input_ids, batch.attention_mask)
        return packed, self.part.full_mask(batch.attention_mask)

    def send_activations(self, packed: torch.Tensor, mask: torch.Tensor, batch: Batch) -> Message:  # c2
        sent = self.guard.noise_activations(packed, mask)
        extra = dict(mask=mask.bool(), labels=batch.labels)
        if self.budget:
            return self.budget.message(sent, extra, self.step)
        return Message({**self.codec.encode(sent, ACT), **extra}, {"step": self.step})

    def receive_gradient(self, reply: Message, up: Message, batch: Batch) -> torch.Tensor:
        if self.scores is not None:
            self.scores[batch.index] = reply.tensors[LOSS]
        return codecs.decode(reply.tensors, GRAD, up.tensors, ACT)

    def backward(self, packed: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, batch: Batch) -> None:  # c5
        self.optimizer.zero_grad(set_to_none=True)
        if self.dp is not None:  # DP-SGD: per-example gradients (privacy.per_example)
            self.private_backward(packed, grad.to(packed.dtype), mask, batch)
        else:
            packed.backward(grad.to(packed.dtype))
        self.rule.on_grad()
        max_norm = self.fw.cfg.train.max_grad_norm
        if max_norm and self.dp is None:
            torch.nn.utils.clip_grad_norm_(self.part.client.parameters(), max_norm)
        self.optimizer.step()

    def private_backward(self, packed, grad, mask, batch: Batch) -> None:
        if self.dp.per_example == "vmap":
            try:
                stacked = per_example.vmap_cut_grads(self.part, self.params, batch.input_ids, batch.attention_mask,
                                                     grad, len(batch.index))
            except RuntimeError as err:
                per_example.fallback_note(err)
                self.dp.per_example = "loop"
            else:
                return self.dp.step_stacked(self.params, stacked, len(batch.index))
        self.dp.step(self.params, example_grads(packed, grad, mask, self.params))

    def result(self) -> ClientResult:
        fw, cid = self.fw, self.cid
        self.guard.account_epochs(fw.cfg.train.local_epochs)
        up = self.guard.upload(self.tunable, models.get_tunable(self.part.client))
        up_msg = Message(with_extras(up, self.rule.upload()))  # cc1
        metrics = {
            "train_loss": sum(self.losses) / max(len(self.losses), 1),
            "client_flops": self.flops,
            "num_samples": self.samples,
            "batches": self.step,
            "adapter_bytes_up": len(serialize(up_msg)),
            "adapter_bytes_down": len(serialize(self.down)),
            "split_layer": self.part.layer,
            **({"modelled_latency_s": round(fw.plan[cid].latency_s, 6)} if fw.plan else {}),
            **(self.budget.record() if self.budget else {}),
            **self.guard.record(),
        }
        kept = self.guard.keep(self.rule.state())
        if self.scores is not None:
            kept = {**(kept or {}), "split_loss": self.scores}
        return ClientResult(up_msg, kept, metrics)


def example_grads(packed, grad, mask, params):
    """Each example's gradient of the client part: the returned gradient is that of the
    batch's mean loss, so an example's own share, times the batch size, is its loss's."""
    counts = mask.sum(1).tolist()  # packed rows are the real tokens, example after example
    start = 0
    for count in counts:
        own = torch.zeros_like(grad)
        own[start:start + count] = grad[start:start + count] * len(counts)
        start += count
        yield torch.autograd.grad(packed, params, own, retain_graph=True, allow_unused=True)
