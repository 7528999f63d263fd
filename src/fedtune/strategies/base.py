"""The strategy protocol, in the spirit of Flower's Strategy: a strategy sees the current
global state and the clients' states with their weights and returns the next global state.
What a strategy remembers between rounds (optimizer moments, control variates) is its
``state_dict``: the round loop checkpoints it with the framework and restores it on resume.

A strategy that needs the clients' help (SCAFFOLD) uses a small client-side protocol, so no
framework special-cases it:
  server  ``downlink(current, cid)``   extra tensors for the client's down message
  client  ``client_rule(extras, state, params)`` -> a ``LocalRule`` that adjusts each local
          step's gradients, adds tensors to the upload and returns the client's new state
  server  ``receive(extras)``          the clients' extra tensors, before ``aggregate``
Extra tensors travel in the same serialized message as the tunable ones, under the ``EXTRA``
prefix, so the bytes they cost are counted like any other.

A strategy that shapes what each client holds or changes the model itself (the rank-aware
ones, strategies/rank.py) does so through three server hooks, so no framework asks which
strategy it has:
  ``for_client(global_state, r)``   the tunable state a client of LoRA rank r receives
  ``after_aggregate(model, ...)``   after ``aggregate``: work on the model, extra record entries
  ``restore(model)``                after ``load_state_dict`` on resume: rebuild that work"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable

import torch

from ..adapters.lora_state import resize
from ..errors import FedtuneError

State = dict[str, torch.Tensor]


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """Sum_i w_i x_i / Sum_i w_i, accumulated in float64 so the result is exact to the
    output dtype's rounding whatever the number or order of clients."""
    if not states:
        raise FedtuneError("nothing to aggregate: no client returned an update")
    total = float(sum(weights))
    if total <= 0:
        raise FedtuneError("aggregation weights must sum to a positive number")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise FedtuneError("clients returned tunable states with different tensor names")
    out = {}
    for k in keys:
        acc = torch.zeros(states[0][k].shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[k].to(torch.float64) * w
        out[k] = (acc / total).to(states[0][k].dtype)
    return out


def pseudo_gradient(current: State, updates: list[tuple[State, float]]) -> State:
    """Reddi et al.'s Delta_t = (weighted) mean of the clients' states - the global state, in the
    global state's dtype: the direction a server optimizer steps along."""
    mean = weighted_mean([s for s, _ in updates], [w for _, w in updates])
    return {k: mean[k].to(current[k].dtype) - current[k] for k in current}


EXTRA = "strategy/"  # tensor names a strategy (not the model) sends or receives


def with_extras(tunable: State, extras: State) -> State:
    return {**tunable, **{EXTRA + k: v for k, v in extras.items()}}


def split_extras(tensors: State) -> tuple[State, State]:
    """A message's tensors -> (tunable parameters, the strategy's extra tensors, unprefixed)."""
    tunable = {k: v for k, v in tensors.items() if not k.startswith(EXTRA)}
    extras = {k[len(EXTRA):]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return tunable, extras


class LocalRule:
    """What a method changes in a client's local training. ``on_grad`` runs after every backward
    pass, before clipping and the optimizer step (adding to a gradient there is adding a term to
    the loss); afterwards ``upload`` adds tensors to the client's message and ``state`` is what
    the client keeps for its next round (None: nothing)."""

    def on_grad(self) -> None:
        pass

    def upload(self) -> State:
        return {}

    def state(self) -> dict[str, Any] | None:
        return None


class LocalRules(LocalRule):
    """Several rules at once (e.g. FedProx's term under SCAFFOLD), applied in order."""

    def __init__(self, rules: Iterable[LocalRule]):
        self.rules = list(rules)

    def on_grad(self) -> None:
        for r in self.rules:
            r.on_grad()

    def upload(self) -> State:
        return {k: v for r in self.rules for k, v in r.upload().items()}

    def state(self) -> dict[str, Any] | None:
        merged = {k: v for r in self.rules for k, v in (r.state() or {}).items()}
        return merged or None


class Strategy(ABC):
    name: str

    def __init__(self, cfg=None):
        self.cfg = cfg

    @abstractmethod
    def aggregate(self, current: State, updates: list[tuple[State, float]]) -> State: ...

    # ---- the client-side protocol (see the module docstring); the defaults do nothing
    def downlink(self, current: State, cid: int) -> State:
        return {}

    def client_rule(self, extras: State, state: dict[str, Any] | None, params: dict[str, torch.nn.Parameter]
                    ) -> LocalRule | None:
        return None

    def receive(self, extras: list[State]) -> None:
        pass

    # ---- the server hooks (see the module docstring); the defaults suit a strategy whose
    # clients all hold the global state as it is, at their own rank
    def for_client(self, global_state: State, r: int) -> State:
        """What a client of LoRA rank ``r`` receives: the global state's leading r components."""
        return resize(global_state, r)

    def after_aggregate(self, model: torch.nn.Module, global_state: State, updates: list[tuple[State, float]],
                        frozen: State) -> dict[str, Any]:
        """After ``aggregate`` built ``global_state`` from ``updates`` (``frozen``: factors no
        client sends, FFA-LoRA's A) -> entries for the server's record."""
        return {}

    def restore(self, model: torch.nn.Module) -> None:
        """After ``load_state_dict`` on resume, with a fresh model: redo what ``after_aggregate``
        changed in it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
