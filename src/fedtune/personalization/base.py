"""The personalization protocol, and ``none``: every client uses the global model.

A method splits a tunable state into what is shared (uploaded, averaged, sent down) and what
stays with the client (``split``), and puts the two back together (``merge``). The framework
calls four hooks, so no framework asks which method it runs:
  server  ``start(state)``      the model's initial tunable state -> the global (shared) one
          ``down(state)``       what a client receives of the global state
          ``global_view(state)`` the global state as one whole model (server evaluation, adapter/)
  client  ``fit(fw, ...)``      the client's round: the personal part merged into what arrived,
                                the framework's own fit, the shared part uploaded, the personal
                                part kept in the client's state under ``PERSONAL``
Each client scores the model it uses on its own test rows (data.client_test_size): under
``none``, the global model it received (``received``); under a method, its personal model as
its round ends."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from .. import models
from ..adapters import lora_state as lora
from ..strategies.base import split_extras, with_extras
from ..training import autocast, train_pass
from ..wire import Message
from . import PERSONAL

State = dict[str, torch.Tensor]


class Personalization:
    name = "none"
    active = False  # whether the client keeps anything of its own

    def __init__(self, cfg):
        self.cfg = cfg
        self.init: State = {}  # the personal part's initial values: what a new client starts from

    # ---- the split of a tunable state
    def split(self, state: State) -> tuple[State, State]:
        """-> (shared, personal)."""
        return state, {}

    def merge(self, shared: State, personal: State) -> State:
        return {**shared, **personal}

    # ---- server
    def start(self, state: State) -> State:
        shared, self.init = self.split(state)
        return shared

    def down(self, state: State) -> State:
        return state

    def global_view(self, state: State) -> State:
        return self.merge(state, self.init) if self.init else state

    # ---- client
    def received(self, fw, cid: int) -> dict[str, float]:
        """Called by a framework's fit once the received global state is in the model."""
        return {} if self.active else evaluate(fw, cid)

    def fit(self, fw, rnd: int, cid: int, msg: Message, state: dict | None, link, rows):
        """The client's round with its personal part merged in; the upload carries the shared part."""
        tunable, extras = split_extras(msg.tensors)
        personal = (state or {}).get(PERSONAL, self.init)
        result = self.train(fw, rnd, cid, Message(with_extras(self.merge(tunable, personal), extras)), state,
                            link, rows)
        up, up_extras = split_extras(result.message.tensors)
        result.message = Message(with_extras(self.split(up)[0], up_extras))
        result.state = {**(result.state or {}), PERSONAL: self.split(every_tunable(fw, self.init))[1]}
        result.metrics.update(evaluate(fw, cid))
        return result

    def train(self, fw, rnd, cid, msg, state, link, rows):
        """The local training on the merged state: by default the framework's own fit."""
        return fw.fit(rnd, cid, msg, state, link, rows=rows)

    def model_state(self, global_state: State, client_state: dict) -> State:
        """A client's whole tunable state: the global shared part with its personal part."""
        return self.merge(self.down(global_state), client_state[PERSONAL])

    def save_clients(self, fw, run: Path, states: Mapping[int, Any]) -> list[int]:
        """adapters/client-K/: each client's personal model in PEFT format, with a README line.
        ``states`` may read each state from disk: one is loaded at a time."""
        saved = []
        for cid in sorted(states):
            st = states[cid]
            if not st or PERSONAL not in st:
                continue
            out = run / "adapters" / f"client-{cid}"
            state = self.model_state(fw.global_state, st)
            models.set_tunable(fw.tunable_module(), fit_shapes(fw, state))
            models.save_adapter(fw.ctx.model, out, fw.ctx.data.label_names, fw.ctx.tokenizer, self.cfg.model.name)
            (out / "README.md").write_text(
                f"Client {cid}'s personal model (fed.personalization={self.name}): the global shared part with "
                f"what client {cid} kept. Use it: fedtune generate {run} --client {cid} \"...\"; "
                f"fedtune export {run} --client {cid} --merged OUT\n")
            saved.append(cid)
        return saved


def fit_shapes(fw, state: State) -> State:
    """``state`` zero-padded to the model's LoRA rank where a framework holds smaller ranks."""
    shapes = getattr(fw, "shapes", None)
    return lora.fit_to(state, shapes) if shapes else state


def every_tunable(fw, also: State) -> State:
    """The model's tunable tensors and those named in ``also`` (a frozen personal head included)."""
    return {n: p.detach().clone() for n, p in fw.tunable_module().named_parameters() if p.requires_grad or n in also}


def evaluate(fw, cid: int) -> dict[str, float]:
    """The model as it is now on client ``cid``'s own test rows -> client_test_<metric> (nothing
    when the client has no test rows). Evaluation work, not counted as the client's FLOPs."""
    ctx = fw.ctx
    tests = ctx.data.client_tests
    if not tests or not len(tests[cid]):
        return {}
    with autocast(fw.cfg.train, ctx.device):
        ev = ctx.task.evaluate(ctx.model, ctx.client_test_batches(cid), ctx.device)
    return {f"client_test_{k}": v for k, v in ev.items() if isinstance(v, (int, float))}


def personal_train(fw, rnd: int, cid: int, rows, on_grad=None) -> tuple[float, int]:
    """``fed.personal_epochs`` passes over the client's rows, on whatever parameters require
    gradients now, shuffled apart from the round's global epochs -> (last mean loss, FLOPs)."""
    ctx, cfg = fw.ctx, fw.cfg
    loss, flops = 0.0, 0
    for e in range(cfg.fed.personal_epochs):
        batches = ctx.client_batches(rnd, cid, cfg.train.local_epochs + e, rows=rows)
        loss, f = train_pass(ctx.model, batches, cfg.train, ctx.device, ctx.flops, ctx.task.loss, on_step=ctx.on_step,
                             flop_fn=lambda b: ctx.task.flops(ctx.flops, b, True), on_grad=on_grad)
        flops += f
    return loss, flops


@contextmanager
def frozen(module: torch.nn.Module, which: Callable[[str], bool]):
    """Within the block, the tunable parameters named by ``which`` take no gradient (FedRep's
    alternating phases: the optimizer a phase builds holds only the others)."""
    params = [p for n, p in module.named_parameters() if p.requires_grad and which(n)]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class KeyedPersonalization(Personalization):
    """A method whose personal part is whole tensors, chosen by name (``keeps``)."""

    active = True

    def keeps(self, name: str) -> bool:
        raise NotImplementedError

    def split(self, state):
        return ({k: v for k, v in state.items() if not self.keeps(k)},
                {k: v for k, v in state.items() if self.keeps(k)})


class WholeModel(Personalization):
    """A method whose client keeps a whole personal model beside the global one (finetune,
    ditto): everything is shared, the personal model is trained after the global update."""

    active = True

    def fit(self, fw, rnd, cid, msg, state, link, rows):
        tunable = fit_shapes(fw, split_extras(msg.tensors)[0])
        result = fw.fit(rnd, cid, msg, state, link, rows=rows)  # the global model's update, uploaded
        models.set_tunable(fw.tunable_module(), self.personal_start(tunable, state))
        loss, flops = personal_train(fw, rnd, cid, rows, self.rule(fw, tunable))
        result.state = {**(result.state or {}), PERSONAL: models.get_tunable(fw.tunable_module())}
        m = result.metrics
        m.update(personal_loss=loss, client_flops_personal=flops, client_flops=m.get("client_flops", 0) + flops)
        m.update(evaluate(fw, cid))
        return result

    def personal_start(self, received: State, state: dict | None) -> State:
        raise NotImplementedError

    def rule(self, fw, received: State):
        return None

    def model_state(self, global_state, client_state):
        return client_state[PERSONAL]
