"""Record-level DP-SGD on each client (Abadi et al., 2016), ``privacy.dp_sgd``: every optimizer
step a client takes on its tunable parameters uses per-example gradients, each clipped to L2
norm ``privacy.clip``, summed, plus Gaussian noise of std noise_multiplier x clip on the sum.
Under ``privacy.sampler = poisson`` (privacy/sampling.py) each record joins each step with
probability q = batch_size / n and the noised sum is divided by the expected batch q n (the
sensitivity of the mean stays clip / (q n) whatever the draw); under ``shuffle`` by the batch's
size. The accountant (``privacy.accountant``) counts each step at q.

Per-example gradients come from privacy/per_example.py (``privacy.per_example``: vmap, one
batched pass; loop, one backward pass per example, the oracle).

Under kd each step also carries a slice of public rows (kd's mixed step): the private examples'
gradients are clipped and noised as above, the public rows' distillation gradient is added
unclipped and un-noised (``public_loss`` in ``private_step``). The distillation term reads the
public rows, the current (already privatized) weights and the server's teacher, never a private
row, so the accountant counts the private batches only, at rate q."""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..data import Batch
from ..adapters import ADAPTERS
from ..frameworks import FRAMEWORKS
from .. import training
from . import per_example, sampling
from .accounting import Accountant, calibrate, default_delta

Grads = Sequence[torch.Tensor | None]


def clip_example(grads: Grads, clip: float) -> list[torch.Tensor | None]:
    """One example's gradients scaled together to L2 norm at most ``clip``."""
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None))
    factor = min(1.0, clip / max(float(norm), 1e-12))
    return [None if g is None else g * factor for g in grads]


def example_grads(model: nn.Module, params: list[nn.Parameter], loss_fn, batch: Batch,
                  losses: list[float]) -> Iterator[Grads]:
    """Each example's own gradient (the loss of a one-row batch, cut to its real tokens:
    padding is on the right)."""
    for j in range(len(batch.labels)):
        width = max(int(batch.attention_mask[j].sum()), 1)
        row = Batch(batch.input_ids[j:j + 1, :width], batch.attention_mask[j:j + 1, :width],
                    batch.labels[j:j + 1], batch.index[j:j + 1])
        loss = loss_fn(model, row)
        losses.append(loss.item())
        yield torch.autograd.grad(loss, params, allow_unused=True)


def planned_steps(cfg, n_records: int) -> int:
    """The DP-SGD steps one client takes over the whole run if sampled every round: what
    ``privacy.target_epsilon`` calibrates the noise for."""
    if cfg.privacy.sampler == "poisson":
        per_epoch = lambda rows: sampling.steps_per_epoch(cfg.train.batch_size, rows)  # noqa: E731
    else:
        per_epoch = lambda rows: math.ceil(rows / cfg.train.batch_size)  # noqa: E731
    cut = FRAMEWORKS.has(cfg.framework, "split_cut")  # split.samples_per_round caps the rows of a round
    rows = min(cfg.split.samples_per_round or n_records, n_records) if cut else n_records
    return cfg.fed.rounds * cfg.train.local_epochs * per_epoch(rows)  # kd's public rows ride in the same steps


calibrate_cached = functools.lru_cache(maxsize=64)(calibrate)


class ClientDP:
    """One client's DP-SGD: clip, noise multiplier, sampling rate, and its accountant (client
    state: ``state_dict`` goes into ``ClientResult.state``)."""

    def __init__(self, cfg, n_records: int, state: dict | None = None):
        p = cfg.privacy
        self.clip, self.sampler, self.kind, self.per_example = p.clip, p.sampler, p.accountant, p.per_example
        self.sample_rate = sampling.sample_rate(cfg.train.batch_size, n_records)
        self.expected = self.sample_rate * n_records if p.sampler == "poisson" else None  # the fixed denominator
        self.delta = p.delta or default_delta(n_records)
        self.noise_multiplier = p.noise_multiplier
        if p.target_epsilon:
            self.noise_multiplier = calibrate_cached(p.target_epsilon, self.delta, self.sample_rate,
                                                     planned_steps(cfg, n_records), p.accountant)
        self.accountant = Accountant(state, p.accountant)
        self.equal_lengths = ADAPTERS.has(cfg.model.peft, "virtual_tokens")  # per_example.vmap_grads says why

    def step(self, params: list[nn.Parameter], grads: Iterable[Grads]) -> None:
        """Per-example gradients one at a time (the loop): clip each, sum, then ``finish``."""
        sums: list[torch.Tensor] = [torch.zeros_like(p) for p in params]
        count = 0
        for example in grads:
            for s, g in zip(sums, clip_example(example, self.clip)):
                if g is not None:
                    s += g
            count += 1
        self.finish(params, sums, count)

    def step_stacked(self, params: list[nn.Parameter], stacked: per_example.Stacked, count: int) -> None:
        """Per-example gradients stacked on dim 0 (vmap): clip each, sum, then ``finish``."""
        sums = per_example.clipped_sum(stacked, self.clip) if count else [None] * len(params)
        self.finish(params, [torch.zeros_like(p) if s is None else s.to(p.dtype) for p, s in zip(params, sums)],
                    count)

    def finish(self, params: list[nn.Parameter], sums: list[torch.Tensor], count: int) -> None:
        """Set each ``p.grad`` to (sum of clipped example gradients + noise) / denominator and
        count one step. The noise comes from torch's global RNG, which the round loop seeds
        per (run, round, client), so a resumed run draws the same noise."""
        for p, s in zip(params, sums):
            if self.noise_multiplier:
                s += torch.randn_like(s) * (self.noise_multiplier * self.clip)
            p.grad = s / (self.expected or max(count, 1))
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    def record(self) -> dict:
        out = {"epsilon": self.accountant.epsilon(self.delta), "delta": self.delta,
               "noise_multiplier": self.noise_multiplier, "dp_steps": self.accountant.steps,
               "sample_rate": self.sample_rate, "accountant": self.kind, "sampler": self.sampler}
        if self.sampler != "poisson":  # the figure is Poisson's; fixed-size shuffled batches are not
            out["epsilon_assumes"] = "poisson"
        return out

    def state_dict(self) -> dict:
        return self.accountant.state_dict()


def for_client(cfg, n_records: int, state: dict | None) -> ClientDP | None:
    """The client's DP-SGD with the accountant it kept (None when privacy.dp_sgd is off)."""
    if not cfg.privacy.dp_sgd:
        return None
    return ClientDP(cfg, n_records, (state or {}).get("dp"))


def keep(dp: ClientDP | None, state: dict | None) -> dict | None:
    """The client state to return: ``state`` plus the accountant."""
    return state if dp is None else {**(state or {}), "dp": dp.state_dict()}


def private_grads(model, params, loss_fn, private: Batch, dp: ClientDP) -> list[float]:
    """Set the DP-SGD gradient of ``loss_fn`` over ``private``'s examples -> each example's loss."""
    losses: list[float] = []
    if dp.per_example == "vmap" and len(private.labels):
        try:
            stacked, losses = per_example.vmap_grads(model, params, loss_fn, private, dp.equal_lengths)
        except RuntimeError as err:  # a forward vmap cannot trace: the loop from now on
            per_example.fallback_note(err)
            dp.per_example = "loop"
        else:
            dp.step_stacked(params, stacked, len(losses))
            return losses
    dp.step(params, example_grads(model, params, loss_fn, private, losses))
    return losses


def private_step(model, params: list[nn.Parameter], loss_fn, private: Batch, dp: ClientDP,
                 public_loss: Callable[[], torch.Tensor | None] | None = None, weight: float = 1.0,
                 on_losses: Callable[[list[float]], None] | None = None) -> float:
    """Set each ``p.grad`` to ``weight`` x the DP-SGD gradient of ``loss_fn`` over ``private``'s
    examples, plus the plain gradient of ``public_loss()`` (kd: lambda x KD on public rows, None
    when the step has none) -> the step's loss, weight x mean private loss + public loss.
    ``on_losses`` receives the examples' losses (kd's metrics)."""
    losses = private_grads(model, params, loss_fn, private, dp)
    if on_losses:
        on_losses(losses)
    loss = weight * sum(losses) / max(len(losses), 1)
    extra = public_loss() if public_loss else None
    public = torch.autograd.grad(extra, params, allow_unused=True) if extra is not None else [None] * len(params)
    for p, g in zip(params, public):
        p.grad = p.grad * weight if g is None else p.grad * weight + g
    return loss + (extra.item() if extra is not None else 0.0)


def train_pass(model, batches, cfg, device, flops, loss_fn, dp: ClientDP, optimizer=None, on_step=None,
               flop_fn=None, on_grad=None, private_of=None, public_loss=None, weight: float = 1.0,
               on_losses=None) -> tuple[float, int]:
    """``training.train_pass`` with DP-SGD steps (train.max_grad_norm is replaced by the
    per-example clip). ``on_grad`` (FedProx's term) acts on the privatized gradient: it reads no
    private row, so the guarantee is unchanged. kd's mixed steps: ``private_of(step)`` is the
    step's private batch, ``public_loss(model, step)`` its public term (``private_step``)."""

    def step_grads(model, params, step) -> float:
        private = private_of(step) if private_of else step
        public = (lambda: public_loss(model, step)) if public_loss else None
        return private_step(model, params, loss_fn, private, dp, public, weight, on_losses)

    return training.train_pass(model, batches, cfg, device, flops, loss_fn, optimizer, on_step, flop_fn, on_grad,
                               step_grads=step_grads)
