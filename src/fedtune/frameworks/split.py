"""Split-FedLLM (SplitLoRA, SplitFed-V2 style): the model is cut after ``split.split_layer``
blocks. Per batch, the client runs its part and sends the activations (c1, c2); the server
runs the rest, computes the loss, steps its optimizer and returns the activations' gradient
(c3, c4); the client backpropagates it and steps (c5). One server-side part serves every
client in turn. At the end of a round the clients upload their client-side LoRA, which the
server averages and sends back (cc1-cc4).

Activations cross the cut packed (real tokens only, see model_cut.py) and, optionally,
compressed: ``split.act_dtype`` fp16/bf16/int8 (a scale per token) and ``split.act_topk``
(the fraction of each token's values kept, by magnitude), or per batch under a traffic budget
(``split.act_budget_mb``, split_budget.py). The client applies the returned gradient to its exact
activations (straight-through); with top-k the server answers only for the kept entries, the
others got no gradient.

Clients may keep different numbers of blocks (``split.client_layers``, or ``split.auto`` with the
cost model of split_plan.py). The server then serves every cut: it holds the blocks above the
widest cut once and its own copy of each block b that some clients hold (cut > b) and it runs
for others (cut <= b). At the end of a round each client-side tensor is the sample-weighted mean
over the clients that hold it, and for a block b with a server copy, that copy joins the mean
weighted by the samples of the round's clients cut at or below b (whose batches trained it);
the copy then restarts from the mean. With one cut for all this is today's FedAvg of the client
parts, through the strategy.

``split.sample = loss``: with ``samples_per_round`` below the shard, a client takes the rows with
the highest loss the server reported the last time they were sent (kept in the client's state),
rows never sent first, ties in the seeded shuffle's order."""

from __future__ import annotations

import copy
import logging
import math
import random
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import compression, models
from . import split_budget, split_plan
from .. import data as datalib
from ..config import split_layer_for
from ..data import Batch
from ..errors import FedtuneError
from ..metrics import MB
from ..wire import Message, serialize
from ..model_cut import CutModel
from ..privacy import attacks, dp_sgd, outputs
from ..strategies.base import split_extras, weighted_mean, with_extras
from ..training import autocast, derive_seed, make_optimizer, seeded
from .base import ClientResult, Context, Framework

ACT, GRAD, LOSS = "act.", "grad.", "loss.rows"
log = logging.getLogger(__name__)


class SplitFramework(Framework):
    name = "split"
    per_batch = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        s, depth = self.cfg.split, ctx.model.config.num_hidden_layers
        self.plan = None  # split.auto: each client's modelled cut cost
        if s.auto:
            self.plan = split_plan.plan(self.workloads(depth), s.client_profiles, s.server_flops_per_s)
            log.info(split_plan.describe(self.plan))
            self.cuts = [c.cut for c in self.plan]
        else:
            self.cuts = list(s.client_layers) or [split_layer_for(s.split_layer, depth)] * self.cfg.fed.clients
        if not all(1 <= c <= depth - 1 for c in self.cuts):
            raise FedtuneError(f"split.client_layers must be cuts in 1..{depth - 1} for this {depth}-block model; "
                               f"got {s.client_layers}")
        lo, hi = min(self.cuts), max(self.cuts)
        self.split = CutModel(ctx.model, hi)  # the widest client part: what global_state holds
        glue = self.split.glue
        # Blocks lo..hi-1 are held by some clients and run by the server for others: the server
        # trains its own copies of them, so that no client's step writes what the server runs.
        copies = [copy.deepcopy(block) for block in glue.blocks[lo:hi]]
        self.parts = {c: self.split if c == hi else CutModel(ctx.model, c, [*copies[c - lo:], *glue.blocks[hi:]])
                      for c in sorted(set(self.cuts))}
        self.server_part = nn.ModuleList([*copies, *glue.blocks[hi:], *glue.server_modules])
        # The copies under the names their blocks have in global_state (client modules come first).
        self.mirror = nn.ModuleList([*glue.client_modules, *glue.blocks[:lo], *copies])
        first = len(glue.client_modules) + lo
        self.copy_keys = {k for k in models.tunable_names(self.mirror) if int(k.split(".")[0]) >= first}
        self.global_state = models.get_tunable(self.split.client)  # the client part's LoRA
        # The server keeps its part and its optimizer across clients and rounds.
        self.server_opt = make_optimizer(self.server_part, self.cfg.train)
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

    # ---- the cuts
    def workloads(self, depth: int) -> list[split_plan.Workload]:
        """Each client's round for the cost model (split_plan.py), from its data and the model."""
        ctx, s, train = self.ctx, self.cfg.split, self.cfg.train
        config = ctx.model.config
        glue = CutModel(ctx.model, 1).glue
        adapter = [0] + [len(serialize(Message(models.get_tunable(CutModel(ctx.model, c).client))))
                         for c in range(1, depth)]
        shape = dict(
            flops=ctx.flops, batch=train.batch_size, hidden=getattr(config, "hidden_size", None) or config.n_embd,
            heads=getattr(config, "num_attention_heads", None) or config.n_head,
            value_bytes=split_plan.VALUE_BYTES[s.act_dtype],
            base_params=sum(p.numel() for m in glue.client_modules for p in m.parameters()),
            block_params=tuple(sum(p.numel() for p in b.parameters()) for b in glue.blocks),
            adapter_bytes=tuple(adapter))
        out = []
        for cid in range(self.cfg.fed.clients):
            rows = ctx.ids[f"client{cid}"]
            out.append(split_plan.Workload(
                length=split_plan.mean_length(rows, self.cfg.data.max_length),
                batches=split_plan.batches_per_round(len(rows), s.samples_per_round, train.batch_size,
                                                     train.local_epochs), **shape))
        return out

    # ---- server side
    def configure(self, rnd, cid):  # cc3: the global client-side LoRA
        if len(set(self.cuts)) == 1:
            return self.down_message(cid)
        held = set(models.tunable_names(self.parts[self.cuts[cid]].client))
        return Message({k: v for k, v in self.global_state.items() if k in held})

    def serve(self, rnd, cid, msg):  # c3, c4
        dev, split, task = self.ctx.device, self.parts[self.cuts[cid]], self.ctx.task
        mask = msg.tensors["mask"].to(dev)
        # The server never sees the token ids: the task's targets follow from the labels.
        batch = Batch(None, mask, msg.tensors["labels"].to(dev), None)
        tiered = f"{ACT}tiers" in msg.tensors
        act = split_budget.decode(msg.tensors, ACT) if tiered else self.decode_activations(msg.tensors)
        act = act.to(dev).requires_grad_()
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
            if self.cfg.split.sample == "loss":  # each row's loss goes back: the client ranks rows by it
                rows = F.cross_entropy(out.float(), task.targets(batch), reduction="none")
                loss = rows.mean()
            else:
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
            if tiered:
                tensors = split_budget.encode_like(grad, msg.tensors, ACT, GRAD)
            else:
                if f"{ACT}index" in msg.tensors:  # only the kept entries reached the server
                    grad = grad.gather(-1, msg.tensors[f"{ACT}index"].long().to(dev))
                tensors = compression.quantize(grad, self.cfg.split.act_dtype, GRAD)
            if self.cfg.split.sample == "loss":
                tensors[LOSS] = rows.detach().float()
            reply = Message(tensors, {"loss": loss.item()})
            m = self.server_meter
            m["server_flops"] += task.flops(self.ctx.flops, batch, True, blocks=range(split.layer, split.num_blocks))
            m["server_train_seconds"] += time.perf_counter() - start
            m["server_train_samples"] += mask.shape[0] if update else 0
        return reply

    def aggregate(self, rnd, results):  # cc2
        record = self.aggregate_tunable(results) if len(set(self.cuts)) == 1 else self.aggregate_blocks(results)
        meter, self.server_meter = self.server_meter, dict.fromkeys(self.server_meter, 0)
        cuts = split_plan.record(self.plan) if self.plan else {"client_layers": self.cuts}
        return {**meter, **record, **cuts}

    def aggregate_blocks(self, results) -> dict:
        """Clients with different cuts: per tensor, the sample-weighted mean over the clients that
        hold it, with the server's copy (for a block it also ran) weighted by the samples of the
        clients it ran that block for; the copies restart from the mean."""
        ups = [(split_extras(msg.tensors)[0], m["num_samples"]) for msg, m in results.values()]
        server = models.get_tunable(self.mirror)
        new = {}
        for key, current in self.global_state.items():
            states = [({key: t[key]}, n) for t, n in ups if key in t]
            served = sum(n for t, n in ups if key not in t)
            if key in self.copy_keys and served:
                states.append(({key: server[key]}, served))
            new[key] = weighted_mean(*zip(*states))[key] if states else current
        self.global_state = new
        with torch.no_grad():
            for key, p in self.mirror.named_parameters():
                if key in self.copy_keys:
                    p.copy_(new[key])
        return {}

    # ---- client side
    def fit(self, rnd, cid, msg, state, link):
        if link is None:
            raise FedtuneError("split learning needs a runtime that links each client to the server per batch")
        ctx, split, train, s = self.ctx, self.parts[self.cuts[cid]], self.cfg.train, self.cfg.split
        tunable, rule = self.local_rule(msg, state)
        models.set_tunable(split.client, tunable)  # cc4
        optimizer = make_optimizer(split.client, train)
        dp = dp_sgd.for_client(self.cfg, len(ctx.data.clients[cid]), state)
        odp = outputs.for_client(self.cfg, len(ctx.data.clients[cid]), state)
        params = [p for p in split.client.parameters() if p.requires_grad]
        client_blocks = range(0, split.layer)
        scores = None  # split.sample=loss: each row's last reported loss (NaN: never sent)
        if s.sample == "loss":
            scores = (state or {}).get("split_loss", torch.full((len(ctx.data.clients[cid]),), math.nan)).clone()
        budget = Budget(s.act_budget_mb * MB, train.local_epochs * split_plan.batches_per_round(
            len(ctx.data.clients[cid]), s.samples_per_round, train.batch_size, 1)) if s.act_budget_mb else None
        flops, step, samples = 0, 0, 0
        for epoch in range(train.local_epochs):
            batches = (self.loss_batches(rnd, cid, epoch, scores) if scores is not None
                       else ctx.client_batches(rnd, cid, epoch, s.samples_per_round))
            losses = []
            for batch in batches:
                batch = batch.to(ctx.device)
                split.client.train()
                with autocast(train, ctx.device):
                    packed = split.client_forward(batch.input_ids, batch.attention_mask)  # c1
                mask = split.full_mask(batch.attention_mask)
                sent = odp.activations(packed, mask) if odp else packed.detach()
                extra = dict(mask=mask.bool(), labels=batch.labels)
                if budget:
                    up = budget.message(sent, extra, step)
                else:
                    up = Message({**self.encode_activations(sent), **extra}, {"step": step})
                reply = link.exchange(up)  # c2 ... c4
                if budget:
                    grad = split_budget.decode(reply.tensors, GRAD, up.tensors, ACT).to(ctx.device)
                else:
                    grad = compression.dequantize(reply.tensors, GRAD).to(ctx.device)
                    if f"{ACT}index" in up.tensors:
                        grad = torch.zeros_like(packed).scatter_(-1, up.tensors[f"{ACT}index"].long(), grad)
                if scores is not None:
                    scores[batch.index] = reply.tensors[LOSS]
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
            "split_layer": split.layer,
            **({"modelled_latency_s": round(self.plan[cid].latency_s, 6)} if self.plan else {}),
            **(budget.record() if budget else {}),
            **attacks.mark(self.cfg, cid), **(dp.record() if dp else {}), **(odp.record() if odp else {}),
        }
        kept = outputs.keep(odp, dp_sgd.keep(dp, rule.state()))
        if scores is not None:
            kept = {**(kept or {}), "split_loss": scores}
        return ClientResult(up_msg, kept, metrics)

    def loss_batches(self, rnd: int, cid: int, epoch: int, scores: torch.Tensor) -> list[Batch]:
        """The client's rows by falling last-reported loss (never-sent rows first, ties in the
        seeded shuffle's order), the first ``samples_per_round`` of them, batched in that order."""
        ctx, d = self.ctx, self.cfg.data
        order = list(range(len(scores)))
        random.Random(derive_seed(self.cfg.seed, "shuffle", rnd, cid, epoch)).shuffle(order)
        order.sort(key=lambda i: -math.inf if math.isnan(scores[i]) else -scores[i].item())
        order = order[: self.cfg.split.samples_per_round or None]
        ids = ctx.ids[f"client{cid}"]
        labels = attacks.flip_labels(self.cfg, cid, ctx.data.clients[cid].labels, ctx.data.num_labels)
        size = self.cfg.train.batch_size
        return [datalib.collate([ids[i] for i in rows], [labels[i] for i in rows], rows, ctx.tokenizer.pad_token_id,
                                d.padding, d.max_length)
                for rows in (order[i:i + size] for i in range(0, len(order), size))]

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
        return {**super().state_dict(), "server_state": models.get_tunable(self.server_part),
                "server_opt": self.server_opt.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        models.set_tunable(self.server_part, state["server_state"])
        self.server_opt.load_state_dict(state["server_opt"])


class Budget:
    """A client's activation uploads in one round under ``split.act_budget_mb`` (split_budget.py):
    each batch gets the bytes left divided by the batches left, and the most precise rung whose
    serialized message fits."""

    def __init__(self, total_bytes: float, batches: int):
        self.left, self.batches = total_bytes, batches
        self.tally: dict[str, int] = {}
        self.over = 0

    def message(self, sent: torch.Tensor, extra: dict, step: int) -> Message:
        share = self.left / max(self.batches, 1)
        for rung in range(len(split_budget.RUNGS)):
            msg = Message({**split_budget.encode(sent, rung, ACT), **extra}, {"step": step})
            size = len(serialize(msg))
            if size <= share:
                break
        else:
            self.over += 1
        self.left -= size
        self.batches -= 1
        split_budget.tally(self.tally, msg.tensors, ACT, sent.shape[0])
        return msg

    def record(self) -> dict:
        return {**self.tally, "act_over_budget_batches": self.over}
