"""Split-FedLLM (SplitLoRA, SplitFed-V2 style): the model is cut after ``split.split_layer``
blocks. Per batch, the client runs its part and sends the activations (c1, c2); the server
runs the rest, computes the loss, steps its optimizer and returns the activations' gradient
(c3, c4); the client backpropagates it and steps (c5). One server-side part serves every
client in turn. At the end of a round the clients upload their client-side LoRA, which the
server averages and sends back (cc1-cc4).

Activations cross the cut packed (real tokens only, see model_cut.py) and, optionally,
compressed: ``split.act_dtype`` fp16/bf16/int8 (a scale per token) and ``split.act_topk``
(the fraction of each token's values kept, by magnitude). The client applies the returned
gradient to its exact activations (straight-through); with top-k the server answers only
for the kept entries, the others got no gradient."""

from __future__ import annotations

import math
import threading
import time

import torch
import torch.nn.functional as F

from .. import compression, models
from ..config import split_layer_for
from ..data import Batch
from ..errors import FedtuneError
from ..wire import Message, serialize
from ..model_cut import CutModel
from ..privacy import attacks, dp_sgd, outputs
from ..strategies.base import with_extras
from ..training import autocast, make_optimizer, seeded
from .base import ClientResult, Context, Framework

ACT, GRAD = "act.", "grad."


class SplitFramework(Framework):
    name = "split"
    per_batch = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        depth = ctx.model.config.num_hidden_layers
        self.split = CutModel(ctx.model, split_layer_for(self.cfg.split.split_layer, depth))
        self.global_state = models.get_tunable(self.split.client)  # the client part's LoRA
        # The server keeps its part and its optimizer across clients and rounds.
        self.server_opt = make_optimizer(self.split.server, self.cfg.train)
        self.server_lock = threading.Lock()  # one server part: concurrent clients take turns
        self.server_meter = {"server_flops": 0, "server_train_seconds": 0.0, "server_train_samples": 0}

    # ---- what crosses the cut
    def encode_activations(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.cfg.split
        if s.act_topk:
            k = max(1, math.ceil(s.act_topk * packed.shape[-1]))
            return compression.topk_encode(packed, k, s.act_dtype, ACT, magnitude=True)
        return compression.quantize(packed, s.act_dtype, ACT)

    @staticmethod
    def decode_activations(t: dict[str, torch.Tensor]) -> torch.Tensor:
        if f"{ACT}index" in t:
            return compression.topk_decode_dense(t, prefix=ACT)
        return compression.dequantize(t, ACT)

    # ---- server side
    def configure(self, rnd, cid):  # cc3: the global client-side LoRA
        return self.down_message(cid)

    def serve(self, rnd, cid, msg):  # c3, c4
        dev, split, task = self.ctx.device, self.split, self.ctx.task
        mask = msg.tensors["mask"].to(dev)
        # The server never sees the token ids: the task's targets follow from the labels.
        batch = Batch(None, mask, msg.tensors["labels"].to(dev), None)
        act = self.decode_activations(msg.tensors).to(dev).requires_grad_()
        # Seeded per batch: the server's dropout does not depend on which client came first.
        # A "no_update" message asks for the activations' gradient only (EWC's Fisher, continual.py):
        # the server part neither steps nor drops out.
        update = not msg.meta.get("no_update")
        with self.server_lock, seeded(self.cfg.seed, "serve", rnd, cid, msg.meta["step"]):
            start = time.perf_counter()
            split.server.train(update)
            with autocast(self.cfg.train, dev):
                out = split.server_forward(act, mask)
                if split.causal_lm:  # final hidden states: the task applies the LM head at its positions
                    out = task.from_hidden(self.ctx.model, out, batch)
            loss = F.cross_entropy(out.float(), task.targets(batch))
            self.server_opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.max_grad_norm and update:
                torch.nn.utils.clip_grad_norm_(split.server.parameters(), self.cfg.train.max_grad_norm)
            if update:
                self.server_opt.step()
            else:
                self.server_opt.zero_grad(set_to_none=True)
            grad = act.grad
            if f"{ACT}index" in msg.tensors:  # only the kept entries reached the server
                grad = grad.gather(-1, msg.tensors[f"{ACT}index"].long().to(dev))
            reply = Message(compression.quantize(grad, self.cfg.split.act_dtype, GRAD), {"loss": loss.item()})
            m = self.server_meter
            m["server_flops"] += task.flops(self.ctx.flops, batch, True, blocks=range(split.layer, split.num_blocks))
            m["server_train_seconds"] += time.perf_counter() - start
            m["server_train_samples"] += mask.shape[0] if update else 0
        return reply

    def aggregate(self, rnd, results):  # cc2
        record = self.aggregate_tunable(results)
        meter, self.server_meter = self.server_meter, dict.fromkeys(self.server_meter, 0)
        return {**meter, **record}

    # ---- client side
    def fit(self, rnd, cid, msg, state, link):
        if link is None:
            raise FedtuneError("split learning needs a runtime that links each client to the server per batch")
        ctx, split, train = self.ctx, self.split, self.cfg.train
        tunable, rule = self.local_rule(msg, state)
        models.set_tunable(split.client, tunable)  # cc4
        optimizer = make_optimizer(split.client, train)
        dp = dp_sgd.for_client(self.cfg, len(ctx.data.clients[cid]), state)
        odp = outputs.for_client(self.cfg, len(ctx.data.clients[cid]), state)
        params = [p for p in split.client.parameters() if p.requires_grad]
        client_blocks = range(0, split.layer)
        flops, step, samples = 0, 0, 0
        for epoch in range(train.local_epochs):
            batches = ctx.client_batches(rnd, cid, epoch, self.cfg.split.samples_per_round)
            losses = []
            for batch in batches:
                batch = batch.to(ctx.device)
                split.client.train()
                with autocast(train, ctx.device):
                    packed = split.client_forward(batch.input_ids, batch.attention_mask)  # c1
                mask = split.full_mask(batch.attention_mask)
                sent = odp.activations(packed, mask) if odp else packed.detach()
                up = self.encode_activations(sent)
                up.update(mask=mask.bool(), labels=batch.labels)
                reply = link.exchange(Message(up, {"step": step}))  # c2 ... c4
                grad = compression.dequantize(reply.tensors, GRAD).to(ctx.device)
                if f"{ACT}index" in up:
                    grad = torch.zeros_like(packed).scatter_(-1, up[f"{ACT}index"].long(), grad)
                optimizer.zero_grad(set_to_none=True)
                if dp is not None:  # c5 as DP-SGD: one backward per example
                    dp.step(params, self.example_grads(packed, grad.to(packed.dtype), mask, params))
                else:
                    packed.backward(grad.to(packed.dtype))  # c5
                rule.on_grad()
                if train.max_grad_norm and dp is None:
                    torch.nn.utils.clip_grad_norm_(split.client.parameters(), train.max_grad_norm)
                optimizer.step()
                losses.append(reply.meta["loss"])
                flops += ctx.flops.count(*batch.shape, train=True, blocks=client_blocks, head=False)
                step += 1
                if ctx.on_step:
                    ctx.on_step(len(losses), len(batches))
            samples = max(samples, sum(len(b.index) for b in batches))
        if odp:
            odp.account_epochs(train.local_epochs)
        up = attacks.poison(self.cfg, cid, tunable, models.get_tunable(split.client))
        up_msg = Message(with_extras(up, rule.upload()))  # cc1
        metrics = {
            "train_loss": sum(losses) / max(len(losses), 1),
            "client_flops": flops,
            "num_samples": samples,
            "batches": step,
            "adapter_bytes_up": len(serialize(up_msg)),
            "adapter_bytes_down": len(serialize(msg)),
            **attacks.mark(self.cfg, cid), **(dp.record() if dp else {}), **(odp.record() if odp else {}),
        }
        return ClientResult(up_msg, outputs.keep(odp, dp_sgd.keep(dp, rule.state())), metrics)

    def loss_grad(self, batch, link, step):
        """The client part's gradient of the batch's loss through a server that does not step
        (EWC's Fisher; the exchange is metered like any other) -> the client part's FLOPs."""
        split = self.split
        packed = split.client_forward(batch.input_ids, batch.attention_mask)
        up = self.encode_activations(packed.detach())
        up.update(mask=split.full_mask(batch.attention_mask).bool(), labels=batch.labels)
        reply = link.exchange(Message(up, {"step": step, "no_update": True}))
        grad = compression.dequantize(reply.tensors, GRAD).to(packed.device)
        if f"{ACT}index" in up:
            grad = torch.zeros_like(packed).scatter_(-1, up[f"{ACT}index"].long(), grad)
        packed.backward(grad.to(packed.dtype))
        return self.ctx.flops.count(*batch.shape, train=True, blocks=range(0, split.layer), head=False)

    @staticmethod
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

    # ---- checkpointing and the final model
    def tunable_module(self):
        return self.split.client

    def state_dict(self):
        return {**super().state_dict(), "server_state": models.get_tunable(self.split.server),
                "server_opt": self.server_opt.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        models.set_tunable(self.split.server, state["server_state"])
        self.server_opt.load_state_dict(state["server_opt"])
