"""The framework protocol: what a client does in a round and what the server does.

A framework never moves bytes itself. The round loop (runtimes/rounds.py) calls, each round:
  server  configure(rnd, cid)            -> Message down to each sampled client
  client  fit(rnd, cid, msg, state, link, rows) -> ClientResult (Message up + the client's state)
  server  aggregate(rnd, {cid: (Message, metrics)})
  server  evaluate(rnd)                   -> test metrics of the global model
and, for a framework that talks per batch (``per_batch = True``: split learning), server
serve(rnd, cid, Message) answers each message a client sends through ``link.exchange``.

What a framework keeps on the server (the global tunable state, a strategy's moments) goes
into ``state_dict``; what a client keeps between rounds is ``ClientResult.state``. The round
loop checkpoints both and restores both on ``--resume``, on every runtime. ``rows`` are the
private rows the client fits on (``ClientRows``: all of them, or a method's subset such as
continual learning's task rows); each ``fit`` opens a ``privacy.guard.ClientGuard`` for what
wraps a client's work (DP-SGD, output noise, a simulated attacker, the accountants' state).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .. import continual
from .. import evalsets
from .. import personalization
from .. import data as datalib
from .. import models
from .. import inference
from .. import precision
from ..tasks import TASKS, make as make_task
from ..tasks.base import Task
from ..config import RunConfig
from .. import strategies
from ..strategies.base import LocalRule, LocalRules, split_extras, with_extras
from ..strategies.prox import Proximal
from ..metering import FlopModel
from ..privacy import attacks, canaries, central_dp, dp_sgd, sampling
from ..wire import Message
from ..training import StepFn, autocast, derive_seed, train_pass


# The key of ``aggregate``'s one result under secure aggregation (privacy.secagg): the clients'
# weighted mean as one upload of their total weight; no client's own upload reaches the server.
SUMMED = -1


@dataclass
class ClientResult:
    message: Message
    state: dict[str, Any] | None = None  # kept by the runtime for the client's next round
    metrics: dict[str, Any] = field(default_factory=dict)  # train_loss, client_flops, num_samples...


class Link(Protocol):
    """A client's channel to the server for messages inside a round."""

    def exchange(self, msg: Message) -> Message: ...


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class ClientRows:
    """The private rows a client fits on in one round: all of them, or the subset a method hands
    in (continual learning: this task's rows plus the replay memory). ``Batch.index`` counts
    within these rows."""

    cid: int
    rows: datalib.Rows
    ids: list[list[int]]  # token ids, one list per row

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> list:
        return self.rows.labels

    def subset(self, idx: list[int]) -> "ClientRows":
        return ClientRows(self.cid, self.rows.subset(idx), [self.ids[i] for i in idx])


@dataclass
class Context:
    """Everything a framework works with: config, data, the one shared model, its meter."""

    cfg: RunConfig
    data: datalib.FedData
    model: nn.Module
    tokenizer: Any
    device: torch.device
    flops: FlopModel
    ids: dict[str, list[list[int]]]  # token ids: "test", "public", "client0", ...
    task: Task
    on_step: StepFn | None = None

    @classmethod
    def build(cls, cfg: RunConfig) -> "Context":
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        precision.resolve(cfg)
        fed = TASKS.load(cfg.train.task).load_data(cfg)
        if cfg.privacy.audit:  # canaries among the private rows, for the privacy audit
            fed = canaries.plant(cfg, fed)
        dtype = precision.dtype_of(cfg.train.precision)
        model, tok = models.build(cfg.model, fed.num_labels, cfg.seed, cfg.train.task, dtype)
        if cfg.model.init_from:  # every framework takes its initial global state from the model
            inference.warm_start(model, cfg, fed.label_names)
        device = pick_device(cfg.train.device)
        if not cfg.model.quantize:  # a quantized base is placed on the GPU as it loads
            model.to(device)
        if dtype != torch.float32:
            precision.autocast_forwards(model, device)
        if cfg.train.compile:
            precision.compile_body(model)
        if cfg.train.gradient_checkpointing:
            models.enable_gradient_checkpointing(model)
        task = make_task(cfg.train.task, tok, fed.label_names, cfg.data.max_length, cfg)
        ids = {"test": task.encode(fed.test), "public": task.encode(fed.public)}
        ids["val"] = task.encode(fed.val) if len(fed.val) else []
        ids.update({f"client{c}": task.encode(s) for c, s in enumerate(fed.clients)})
        ids.update({f"client_test{c}": task.encode(s) for c, s in enumerate(fed.client_tests)})
        return cls(cfg, fed, model, tok, device, FlopModel.of(model), ids, task)

    def batches(self, key: str, labels: list, batch_size: int, shuffle_seed: int | None = None, limit: int = 0,
                by_length: bool = False):
        d = self.cfg.data
        return datalib.batches(
            self.ids[key], labels, batch_size, self.tokenizer.pad_token_id, d.padding, d.max_length, shuffle_seed,
            limit, by_length,
        )

    def client_rows(self, cid: int) -> ClientRows:
        """Every private row of client ``cid``."""
        return ClientRows(cid, self.data.clients[cid], self.ids[f"client{cid}"])

    def client_batches(self, rnd: int, cid: int, epoch: int = 0, limit: int = 0, rows: ClientRows | None = None):
        """The client's private rows (``rows``, or all of them) for this round, shuffled by
        (seed, round, client, epoch); under DP-SGD's Poisson sampler, drawn by that rule
        (privacy/sampling.py)."""
        rows = self.client_rows(cid) if rows is None else rows
        seed = derive_seed(self.cfg.seed, "shuffle", rnd, cid, epoch)
        labels = attacks.flip_labels(self.cfg, cid, rows.labels, self.data.num_labels)
        d, p = self.cfg.data, self.cfg.privacy
        if p.dp_sgd and p.sampler == "poisson":
            return sampling.poisson_batches(rows.ids, labels, self.cfg.train.batch_size, self.tokenizer.pad_token_id,
                                            d.padding, d.max_length, (self.cfg.seed, rnd, cid, epoch), limit)
        return datalib.batches(rows.ids, labels, self.cfg.train.batch_size, self.tokenizer.pad_token_id, d.padding,
                               d.max_length, seed, limit)

    def test_batches(self, limit: int = 0, key: str = "test", rows: list[int] | None = None):
        """Batches of the test rows (``key="val"``: the validation rows); ``rows``: only these."""
        labels = getattr(self.data, key).labels
        if rows is None:  # sorted by length: evaluation pads least (its sums do not depend on the order)
            return self.batches(key, labels, self.cfg.train.eval_batch_size, limit=limit, by_length=True)
        d = self.cfg.data
        return datalib.batches([self.ids[key][i] for i in rows], [labels[i] for i in rows],
                               self.cfg.train.eval_batch_size, self.tokenizer.pad_token_id, d.padding, d.max_length,
                               by_length=True)

    def client_test_batches(self, cid: int):
        """Client ``cid``'s own test rows (data.client_test_size)."""
        return self.batches(f"client_test{cid}", self.data.client_tests[cid].labels, self.cfg.train.eval_batch_size)

    def public_batches(self, labels: list | None = None):
        labels = labels if labels is not None else self.data.public.labels
        return self.batches("public", labels, self.cfg.train.eval_batch_size)


class Framework(ABC):
    name: str
    per_batch = False  # True: clients exchange messages with the server inside a round (serve)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.global_state: dict[str, torch.Tensor] = {}  # the global tunable parameters
        self.strategy = strategies.make(self.cfg)
        self.central_dp = central_dp.make(self.cfg)  # None unless privacy.central_dp
        self.continual = continual.make(self.cfg, ctx.data)  # None unless continual.tasks > 1
        self.personal = personalization.make(self.cfg)  # fed.personalization: what clients keep

    # ---- server side
    @abstractmethod
    def configure(self, rnd: int, cid: int) -> Message: ...

    @abstractmethod
    def aggregate(self, rnd: int, results: dict[int, tuple[Message, dict]]) -> dict[str, Any]: ...

    def aggregate_tunable(self, results: dict[int, tuple[Message, dict]]) -> dict[str, Any]:
        """The strategy's next global state from the uploaded tunable states, weighted by samples
        (the strategy first receives its own extra tensors, e.g. SCAFFOLD's variate deltas; under
        privacy.central_dp the states are clipped and noised first) -> the server record's extras."""
        ups = [(split_extras(msg.tensors), metrics["num_samples"]) for msg, metrics in results.values()]
        self.strategy.receive([extras for (_, extras), _ in ups])
        updates = [(t, w) for (t, _), w in ups]
        record: dict[str, Any] = {}
        if self.central_dp:
            updates, record = self.central_dp.privatize(self.global_state, updates)
        self.global_state = self.strategy.aggregate(self.global_state, updates)
        return record

    def down_message(self, cid: int) -> Message:
        """The global tunable state and whatever the strategy sends along (SCAFFOLD's c)."""
        return Message(with_extras(self.global_state, self.strategy.downlink(self.global_state, cid)))

    def evaluate(self, rnd: int) -> dict[str, float]:
        """The global model on the test rows of this round's plan (evalsets.py), and on the
        validation rows when there are any."""
        n_test = len(self.ctx.data.test)
        which = evalsets.test_plan(self.cfg, rnd, n_test)
        out: dict = {}
        if which:
            rows = evalsets.curve_rows(n_test, self.cfg.eval.curve_size) if which == "curve" else None
            out = self.measure(rnd, "test", rows)
            out.update(test_set=which, test_rows=len(rows) if rows else n_test)
            if len(self.ctx.data.val):
                out.update(self.measure(rnd, "val", None))
        if self.continual:  # accuracy on each task's test rows: the forgetting matrix's rows
            with autocast(self.cfg.train, self.ctx.device):
                out.update(self.continual.evaluate(self, rnd))
        return out

    def measure(self, rnd: int, key: str, rows: list[int] | None) -> dict[str, float]:
        """The task's metrics of the global model on the ``key`` rows, named ``<key>_<metric>``."""
        with autocast(self.cfg.train, self.ctx.device):
            batches = self.ctx.test_batches(key=key, rows=rows)
            ev = dict(self.ctx.task.evaluate(self.global_model(), batches, self.ctx.device))
        if ev.get("samples") and self.cfg.out and key == "test":  # generated answers for a person to read (sft)
            from ..tasks.sft import write_samples

            write_samples(self.cfg.out, rnd, ev["samples"])
        ev.pop("samples", None)
        return {f"{key}_{k}": v for k, v in ev.items()}

    def serve(self, rnd: int, cid: int, msg: Message) -> Message:
        raise NotImplementedError(f"{self.name} exchanges no messages inside a round")

    # ---- client side
    def client_fit(self, rnd: int, cid: int, msg: Message, state: dict | None, link: Link | None) -> ClientResult:
        """``fit`` on the client's rows: this round's task's rows when continual learning is on
        (continual.py), else all of them."""
        rows = self.ctx.client_rows(cid)
        if self.continual:
            return self.continual.fit(self, rnd, msg, state, link, rows)
        if self.personal.active:
            return self.personal.fit(self, rnd, cid, msg, state, link, rows)
        return self.fit(rnd, cid, msg, state, link, rows=rows)

    @abstractmethod
    def fit(self, rnd: int, cid: int, msg: Message, state: dict | None, link: Link | None,
            rows: ClientRows | None = None) -> ClientResult:
        """One client's round on ``rows`` (None: all its private rows)."""

    def local_rule(self, msg: Message, state: dict | None) -> tuple[dict[str, torch.Tensor], LocalRule]:
        """A down message -> (its tunable tensors, the rule the client's local steps follow:
        the strategy's (SCAFFOLD's correction) and FedProx's term when ``fed.prox_mu`` > 0)."""
        tunable, extras = split_extras(msg.tensors)
        params = {n: p for n, p in self.tunable_module().named_parameters() if p.requires_grad}
        rules = [self.strategy.client_rule(extras, state, params)]
        if self.cfg.fed.prox_mu:
            rules.append(Proximal(params, tunable, self.cfg.fed.prox_mu))
        rules.append(self.continual_rule())
        return tunable, LocalRules(r for r in rules if r is not None)

    def continual_rule(self) -> LocalRule | None:
        """continual.method=ewc: the penalty of the tasks the fitting client has closed (else None)."""
        if not self.continual:
            return None
        return self.continual.local_rule({n: p for n, p in self.tunable_module().named_parameters() if p.requires_grad})

    def loss_grad(self, batch, link: Link | None, step: int) -> int:
        """The gradient of the batch's loss in the tunable parameters' ``.grad``, no step taken
        (EWC's Fisher) -> FLOPs."""
        self.ctx.task.loss(self.ctx.model, batch).backward()
        return self.ctx.task.flops(self.ctx.flops, batch, True)

    def local_train(self, rnd: int, cid: int, limit: int = 0, rule: LocalRule | None = None,
                    dp=None, rows: ClientRows | None = None) -> tuple[float, int]:
        """The client's local epochs on its private rows -> (last epoch's mean loss, FLOPs).
        A fresh optimizer each round: nothing but the tunable weights outlives a round.
        ``dp`` (privacy.dp_sgd.ClientDP): every step is a DP-SGD step."""
        ctx, loss, flops = self.ctx, 0.0, 0
        for epoch in range(self.cfg.train.local_epochs):
            batches = ctx.client_batches(rnd, cid, epoch, limit, rows)
            flop_fn = lambda b: ctx.task.flops(ctx.flops, b, True)  # noqa: E731
            on_grad = rule.on_grad if rule else None
            if dp is None:
                loss, f = train_pass(ctx.model, batches, self.cfg.train, ctx.device, ctx.flops, ctx.task.loss,
                                     on_step=ctx.on_step, flop_fn=flop_fn, on_grad=on_grad)
            else:
                loss, f = dp_sgd.train_pass(ctx.model, batches, self.cfg.train, ctx.device, ctx.flops, ctx.task.loss,
                                            dp, on_step=ctx.on_step, flop_fn=flop_fn, on_grad=on_grad)
            flops += f
        return loss, flops

    # ---- checkpointing and the final model
    def tunable_module(self) -> nn.Module:
        """The module whose tunable parameters ``global_state`` holds."""
        return self.ctx.model

    def global_model(self) -> nn.Module:
        """The whole model with the global tunable state loaded (evaluation, saving)."""
        models.set_tunable(self.tunable_module(), self.personal.global_view(self.global_state))
        return self.ctx.model

    def state_dict(self) -> dict[str, Any]:
        state = {"global_state": self.global_state, "strategy": self.strategy.state_dict()}
        if self.central_dp:
            state["central_dp"] = self.central_dp.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]
        self.strategy.load_state_dict(state["strategy"])
        if self.central_dp:
            self.central_dp.load_state_dict(state["central_dp"])
