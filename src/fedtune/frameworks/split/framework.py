"""Split-FedLLM (SplitLoRA, SplitFed-V2 style): the model is cut after ``split.split_layer``
blocks (cut.py). Per batch, the client runs its part and sends the activations (c1, c2); the
server runs the rest, computes the loss, steps its optimizer and returns the activations'
gradient (c3, c4); the client backpropagates it and steps (c5; the client's phases: client.py).
One server-side part serves every client in turn. At the end of a round the clients upload
their client-side LoRA, which the server averages and sends back (cc1-cc4).

Activations cross the cut packed (real tokens only, see cut.py) and, optionally, compressed
(codecs.py): ``split.act_dtype`` fp16/bf16/int8 (a scale per token) and ``split.act_topk`` (the
fraction of each token's values kept, by magnitude), or per batch under a traffic budget
(``split.act_budget_mb``). The gradient comes back in the activations' layout, and the client
applies it to its exact activations (straight-through); with top-k the server answers only for
the kept entries, the others get no gradient.

Clients may keep different numbers of blocks (``split.client_layers``, or ``split.auto`` with the
cost model of plan.py). The server then serves every cut: it holds the blocks above the
widest cut once and its own copy of each block b that some clients hold (cut > b) and it runs
for others (cut <= b). At the end of a round each client-side tensor is the sample-weighted mean
over the clients that hold it, and for a block b with a server copy, that copy joins the mean
weighted by the samples of the round's clients cut at or below b (whose batches trained it);
the copy then restarts from the mean. With one cut for all this is the strategy's aggregation
(FedAvg by default) of the client parts.

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

from ... import data as datalib
from ... import models
from ...config import split_layer_for
from ...data import Batch
from ...errors import FedtuneError
from ...privacy import attacks
from ...strategies.base import split_extras, weighted_mean
from ...precision import dtype_of
from ...training import autocast, derive_seed, make_optimizer, seeded
from ...wire import Message, serialize
from ..base import ClientRows, Context, Framework
from . import codecs, plan
from .client import LOSS, ClientRound, example_grads
from .codecs import ACT, GRAD
from .cut import CutModel

log = logging.getLogger(__name__)


class SplitFramework(Framework):
    name = "split"
    per_batch = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        s, depth = self.cfg.split, ctx.model.config.num_hidden_layers
        self.plan = None  # split.auto: each client's modelled cut cost
        if s.auto:
            self.plan = plan.plan(self.workloads(depth), s.client_profiles, s.server_flops_per_s)
            log.info(plan.describe(self.plan))
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
        # the client part's LoRA (none of it under fed.personalization=client_part: clients keep it)
        self.global_state = self.personal.start(models.get_tunable(self.split.client))
        # The server keeps its part and its optimizer across clients and rounds.
        self.server_opt = make_optimizer(self.server_part, self.cfg.train)
        self.server_lock = threading.Lock()  # one server part: concurrent clients take turns
        self.server_meter = {"server_flops": 0, "server_train_seconds": 0.0, "server_train_samples": 0}

    # ---- the cuts
    def workloads(self, depth: int) -> list[plan.Workload]:
        """Each client's round for the cost model (plan.py), from its data and the model."""
        ctx, s, train = self.ctx, self.cfg.split, self.cfg.train
        config = ctx.model.config
        glue = CutModel(ctx.model, 1).glue
        adapter = [0] + [len(serialize(Message(models.get_tunable(CutModel(ctx.model, c).client))))
                         for c in range(1, depth)]
        shape = dict(
            flops=ctx.flops, batch=train.batch_size, hidden=getattr(config, "hidden_size", None) or config.n_embd,
            heads=getattr(config, "num_attention_heads", None) or config.n_head,
            value_bytes=plan.VALUE_BYTES[s.act_dtype],
            base_params=sum(p.numel() for m in glue.client_modules for p in m.parameters()),
            block_params=tuple(sum(p.numel() for p in b.parameters()) for b in glue.blocks),
            adapter_bytes=tuple(adapter))
        out = []
        for cid in range(self.cfg.fed.clients):
            rows = ctx.ids[f"client{cid}"]
            out.append(plan.Workload(
                length=plan.mean_length(rows, self.cfg.data.max_length),
                batches=plan.batches_per_round(len(rows), s.samples_per_round, train.batch_size,
                                                     train.local_epochs), **shape))
        return out

    # ---- server side
    def configure(self, rnd, cid):  # cc3: the global client-side LoRA
        if len(set(self.cuts)) == 1:
            return self.down_message(cid)
        held = set(models.tunable_names(self.parts[self.cuts[cid]].client))
        return Message({k: v for k, v in self.global_state.items() if k in held})

    def serve(self, rnd, cid, msg):  # c3, c4
        dev, part = self.ctx.device, self.parts[self.cuts[cid]]
        mask = msg.tensors["mask"].to(dev)
        # The server never sees the token ids: the task's targets follow from the labels.
        batch = Batch(None, mask, msg.tensors["labels"].to(dev), None)
        act = codecs.decode(msg.tensors, ACT).to(dev).requires_grad_()
        # Seeded per batch: the server's dropout does not depend on which client came first.
        # A "no_update" message asks for the activations' gradient only (EWC's Fisher, continual.py):
        # the server part neither steps nor drops out.
        update = not msg.meta.get("no_update")
        with self.server_lock, seeded(self.cfg.seed, "serve", rnd, cid, msg.meta["step"]):
            start = time.perf_counter()
            loss, rows = self.server_loss(part, act, batch, update)
            self.server_step(part, loss, update)
            # The gradient goes back in the activations' layout: with top-k, for the kept entries only.
            tensors = codecs.encode_like(act.grad, msg.tensors, ACT, GRAD)
            if rows is not None:  # each row's loss goes back: the client ranks rows by it
                tensors[LOSS] = rows.detach().float()
            reply = Message(tensors, {"loss": loss.item()})
            m = self.server_meter
            m["server_flops"] += self.ctx.task.flops(self.ctx.flops, batch, True, blocks=range(part.layer, part.num_blocks))
            m["server_train_seconds"] += time.perf_counter() - start
            m["server_train_samples"] += mask.shape[0] if update else 0
        return reply

    def server_loss(self, part: CutModel, act: torch.Tensor, batch: Batch, update: bool):
        """The server part's forward from the activations -> (the batch's mean loss, each row's
        loss under split.sample = loss, else None)."""
        part.server.train(update)
        with autocast(self.cfg.train, self.ctx.device):
            # The wire's fp32 activations in the frozen base's dtype (a norm is its first layer).
            out = part.server_forward(act.to(dtype_of(self.cfg.train.precision)), batch.attention_mask)
            if part.causal_lm:  # final hidden states: the task applies the LM head at its positions
                out = self.ctx.task.from_hidden(self.ctx.model, out, batch)
        if self.cfg.split.sample == "loss":
            rows = F.cross_entropy(out.float(), self.ctx.task.targets(batch), reduction="none")
            return rows.mean(), rows
        return F.cross_entropy(out.float(), self.ctx.task.targets(batch)), None

    def server_step(self, part: CutModel, loss: torch.Tensor, update: bool) -> None:
        """Backpropagate the loss (to the activations, and to the server part, which steps if ``update``)."""
        self.server_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.max_grad_norm and update:
            torch.nn.utils.clip_grad_norm_(part.server.parameters(), self.cfg.train.max_grad_norm)
        if update:
            self.server_opt.step()
        else:
            self.server_opt.zero_grad(set_to_none=True)

    def aggregate(self, rnd, results):  # cc2
        record = self.aggregate_tunable(results) if len(set(self.cuts)) == 1 else self.aggregate_blocks(results)
        meter, self.server_meter = self.server_meter, dict.fromkeys(self.server_meter, 0)
        cuts = plan.record(self.plan) if self.plan else {"client_layers": self.cuts}
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
    def fit(self, rnd, cid, msg, state, link, rows=None):
        if link is None:
            raise FedtuneError("split learning needs a runtime that links each client to the server per batch")
        run = ClientRound(self, rnd, cid, msg, state, self.ctx.client_rows(cid) if rows is None else rows)
        for epoch in range(self.cfg.train.local_epochs):
            run.epoch(epoch, link)
        return run.result()

    def loss_batches(self, rnd: int, cid: int, epoch: int, scores: torch.Tensor,
                     rows: ClientRows | None = None) -> list[Batch]:
        """The client's rows by falling last-reported loss (never-sent rows first, ties in the
        seeded shuffle's order), the first ``samples_per_round`` of them, batched in that order."""
        ctx, d = self.ctx, self.cfg.data
        order = list(range(len(scores)))
        random.Random(derive_seed(self.cfg.seed, "shuffle", rnd, cid, epoch)).shuffle(order)
        order.sort(key=lambda i: -math.inf if math.isnan(scores[i]) else -scores[i].item())
        order = order[: self.cfg.split.samples_per_round or None]
        rows = ctx.client_rows(cid) if rows is None else rows
        ids = rows.ids
        labels = attacks.flip_labels(self.cfg, cid, rows.labels, ctx.data.num_labels)
        size = self.cfg.train.batch_size
        return [datalib.collate([ids[i] for i in rows], [labels[i] for i in rows], rows, ctx.tokenizer.pad_token_id,
                                d.padding, d.max_length)
                for rows in (order[i:i + size] for i in range(0, len(order), size))]

    def loss_grad(self, batch, link, step):
        """The client part's gradient of the batch's loss through a server that does not step
        (EWC's Fisher; the exchange is metered like any other) -> the client part's FLOPs."""
        split = self.split
        packed = split.client_forward(batch.input_ids, batch.attention_mask)
        up = codecs.for_config(self.cfg.split).encode(packed.detach(), ACT)
        up.update(mask=split.full_mask(batch.attention_mask).bool(), labels=batch.labels)
        reply = link.exchange(Message(up, {"step": step, "no_update": True}))
        grad = codecs.decode(reply.tensors, GRAD, up, ACT).to(packed.device)
        packed.backward(grad.to(packed.dtype))
        return self.ctx.flops.count(*batch.shape, train=True, blocks=range(0, split.layer), head=False)

    example_grads = staticmethod(example_grads)

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
