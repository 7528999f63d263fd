"""The local loops every framework shares: an optimizer over the tunable parameters and a
training pass over batches with any loss (the task supplies it: tasks.py)."""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from . import precision
from .config import TrainConfig
from .data import Batch
from .metering import FlopModel
from .models import param_groups

LossFn = Callable[[nn.Module, Batch], torch.Tensor]
StepFn = Callable[[int, int], None]


def derive_seed(*parts) -> int:
    """A stable seed from (run seed, purpose, round, client, ...): results do not depend on
    the order in which clients run or on whether a run was resumed."""
    return zlib.crc32("/".join(map(str, parts)).encode())


@contextmanager
def seeded(*parts):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*parts))
        yield


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast of forward passes under train.precision=bf16 (precision.py)."""
    return precision.autocast(cfg.precision, device)


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None, head_lr: float | None = None):
    groups = param_groups(model, cfg.lr if lr is None else lr, cfg.head_lr if head_lr is None else head_lr, cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups)


def train_pass(
    model: nn.Module,
    batches: list[Batch],
    cfg: TrainConfig,
    device: torch.device,
    flops: FlopModel,
    loss_fn: LossFn,
    optimizer=None,
    on_step: StepFn | None = None,
    flop_fn: Callable[[Batch], int] | None = None,
    on_grad: Callable[[], None] | None = None,
    step_grads: Callable[[nn.Module, list[nn.Parameter], Batch], float] | None = None,
) -> tuple[float, int]:
    """One pass over ``batches`` -> (mean loss, training FLOPs); ``flop_fn`` counts a batch
    when the loss does not run the whole model on every token (e.g. tasks.GenerateTask).
    ``on_grad`` adjusts the gradients after each backward pass, before clipping and the step
    (a strategy's LocalRule: FedProx's term, SCAFFOLD's correction). ``step_grads`` replaces
    backward and clipping: it sets the batch's gradients itself and returns its loss (DP-SGD's
    clipped and noised per-example gradients, privacy/dp_sgd.py)."""
    optimizer = optimizer or make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    total_loss, total_flops = 0.0, 0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        if step_grads:
            loss = step_grads(model, trainable, batch)
        else:
            with autocast(cfg, device):
                batch_loss = loss_fn(model, batch)
            batch_loss.backward()
            loss = batch_loss.item()
        if on_grad:
            on_grad()
        if cfg.max_grad_norm and not step_grads:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        total_loss += loss
        total_flops += flop_fn(batch) if flop_fn else flops.count(*batch.shape, train=True)
        if on_step:
            on_step(i + 1, len(batches))
    return total_loss / max(len(batches), 1), total_flops
