"""The client's mixed pass (b8 + b1): each step is a private batch and, when distilling, a
slice of public rows, and minimises

    (1 - lambda) * CE(private batch) + lambda * KD(public slice),   lambda = kd.client_kd_weight

Without a teacher (round 1, or lambda = 0) a step is plain CE, as under fedavg."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data import Batch


@dataclass
class Step:
    """One step of a client's pass: a private batch and, when distilling, a slice of public rows."""

    private: Batch
    public: Batch | None = None

    def to(self, device) -> "Step":
        return Step(self.private.to(device), None if self.public is None else self.public.to(device))


class MixedPass:
    """The losses and FLOP counts of one client's mixed pass, with the CE and KD terms of the
    current epoch kept for the metrics. ``fw`` is the KDFramework (for its KD loss on public
    rows), ``examples`` maps a public batch's index to public examples, ``weight`` is each
    public row's distillation weight."""

    def __init__(self, fw, teacher: torch.Tensor | None, examples: torch.Tensor, weight: torch.Tensor | None,
                 lam: float):
        self.fw, self.task, self.counter = fw, fw.ctx.task, fw.ctx.flops
        self.teacher, self.examples, self.weight, self.lam = teacher, examples, weight, lam
        self.flops = {"train": 0, "kd": 0}
        self.parts: dict[str, list[float]] = {"ce": [], "kd": []}

    def new_epoch(self) -> None:
        self.parts.update(ce=[], kd=[])  # the metrics are the last epoch's, as under fedavg

    def kd(self, model, public: Batch) -> torch.Tensor:
        kd = self.fw.public_kd_loss(model, public, self.examples, self.teacher, self.weight)
        self.parts["kd"].append(kd.item())
        return kd

    def loss(self, model, step: Step) -> torch.Tensor:
        ce = self.private_ce(model, step.private)
        if self.teacher is None:
            return ce
        if step.public is None:
            return (1 - self.lam) * ce
        kd = self.kd(model, step.public)
        return (1 - self.lam) * ce + self.lam * kd

    def flop(self, step: Step) -> int:
        f_train = self.task.flops(self.counter, step.private, True)
        f_kd = self.task.flops(self.counter, step.public, True) if step.public is not None else 0
        self.flops["train"] += f_train
        self.flops["kd"] += f_kd
        return f_train + f_kd

    def private_ce(self, model, batch: Batch) -> torch.Tensor:
        """The CE of a private batch (under DP-SGD, of one example)."""
        ce = self.task.loss(model, batch)
        self.parts["ce"].append(ce.item())
        return ce

    def public_kd(self, model, step: Step) -> torch.Tensor | None:
        """DP-SGD's public term: the KD loss of the step's public slice, added to the noised CE."""
        if self.teacher is None or step.public is None:
            return None
        return self.lam * self.kd(model, step.public)

    def metrics(self) -> dict:
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        out = {"train_loss": mean(self.parts["ce"]),
               "client_flops_train": self.flops["train"], "client_flops_kd": self.flops["kd"]}
        if self.teacher is not None:
            out["client_kd_loss"] = mean(self.parts["kd"])
        return out
