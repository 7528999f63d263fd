"""Continual learning (paper IV.D.1, docs/continual.md): the labels arrive in ``continual.tasks``
groups over rounds, a new group every ``continual.rounds_per_task`` rounds, and a client trains
only on its rows of the current group. Against forgetting the earlier groups:

- ``replay``: when a task ends each client keeps ``replay_per_task`` of that task's rows in its
  memory and trains on them again beside every later task's rows;
- ``ewc`` (Kirkpatrick et al., 2017): when a task ends each client computes the diagonal Fisher
  F of the tunable parameters on that task's rows and keeps (F, the parameters w*); every later
  local step adds ``ewc_lambda``/2 * sum F (w - w*)^2 per past task to its loss (a LocalRule,
  as FedProx's term).

What a client keeps (memory row indices, Fisher and anchors) is its state: it travels in
``ClientResult.state`` under ``continual`` so the round loop checkpoints and resumes it. The
server evaluates the global model on each task's test rows every round (``task_accuracy``);
the rows at each task's last round form the forgetting matrix of the run summary."""

from __future__ import annotations

import random
from typing import Any

import torch

from . import data as datalib
from .errors import FedtuneError
from .strategies.base import LocalRule, State
from .training import derive_seed

KEY = "continual"  # the client state's entry


def label_groups(num_labels: int, tasks: int, seed: int) -> list[list[int]]:
    """The labels shuffled by the run's seed and cut into ``tasks`` contiguous groups whose sizes
    differ by at most one; each group sorted."""
    order = list(range(num_labels))
    random.Random(f"continual-{seed}").shuffle(order)
    return [sorted(order[t * num_labels // tasks:(t + 1) * num_labels // tasks]) for t in range(tasks)]


def rows_in(labels: list, group: list[int]) -> list[int]:
    """The positions of the rows whose label is in ``group``."""
    wanted = set(group)
    return [i for i, y in enumerate(labels) if int(y) in wanted]


def forgetting_matrix(server_records: list[dict[str, Any]]) -> list[list[float]]:
    """A[i][j] = accuracy on task j after the last round of task i (the records marked task_end)."""
    ends = sorted((r for r in server_records if r.get("task_end")), key=lambda r: r["round"])
    return [list(r["task_accuracy"]) for r in ends]


def average_forgetting(matrix: list[list[float]]) -> float | None:
    """Mean over the tasks j < T-1 of max_i A[i][j] - A[T-1][j] (Chaudhry et al., 2018); the max
    runs over the rows i from task j on. None when fewer than two tasks have ended."""
    if len(matrix) < 2:
        return None
    last = matrix[-1]
    drops = [max(row[j] for row in matrix[j:-1]) - last[j] for j in range(len(matrix) - 1)]
    return sum(drops) / len(drops)


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run summary's continual entries: the forgetting matrix, the average forgetting and
    the final mean accuracy over every task (empty for a run without tasks)."""
    matrix = forgetting_matrix([r for r in records if r["client"] == "server"])
    if not matrix:
        return {}
    return {"forgetting_matrix": matrix, "forgetting": average_forgetting(matrix),
            "average_task_accuracy": sum(matrix[-1]) / len(matrix[-1])}


class EWC(LocalRule):
    """lambda/2 * sum_u sum_k F_u[k] (w[k] - w*_u[k])^2 over the past tasks u; its gradient
    lambda * sum_u F_u (w - w*_u) is added after each backward pass."""

    def __init__(self, params: dict[str, torch.nn.Parameter], past: list[dict[str, State]], lam: float):
        self.params, self.lam = params, lam
        self.past = [{part: {k: task[part][k].to(p.device, p.dtype) for k, p in params.items()}
                      for part in ("fisher", "anchor")} for task in past]

    def penalty(self) -> torch.Tensor:
        total = sum(((t["fisher"][k] * (p - t["anchor"][k]) ** 2).sum() for t in self.past for k, p in
                     self.params.items()), torch.zeros(()))
        return self.lam / 2 * total

    @torch.no_grad()
    def on_grad(self):
        for k, p in self.params.items():
            term = self.lam * sum(t["fisher"][k] * (p - t["anchor"][k]) for t in self.past)
            if p.grad is None:
                p.grad = term.clone()
            else:
                p.grad += term


class Continual:
    """One run's tasks: which rows a client trains on in a round, what it keeps when a task ends,
    and the per-task evaluation."""

    def __init__(self, cfg, fed: datalib.FedData):
        self.cfg, self.c = cfg, cfg.continual
        if fed.num_labels < self.c.tasks:
            raise FedtuneError(f"continual.tasks={self.c.tasks} needs at least as many labels; the data has "
                               f"{fed.num_labels}")
        self.groups = label_groups(fed.num_labels, self.c.tasks, cfg.seed)
        empty = [t for t, g in enumerate(self.groups) if not rows_in(fed.test.labels, g)]
        if empty:
            raise FedtuneError(f"continual task {empty[0]} has no test rows to measure forgetting on: raise "
                               f"data.test_size (now {cfg.data.test_size}) or lower continual.tasks")
        self.past: list[dict[str, State]] = []  # the fitting client's EWC terms (see fit)

    def task_of(self, rnd: int) -> int:
        return min((rnd - 1) // self.c.rounds_per_task, self.c.tasks - 1)

    def is_task_end(self, rnd: int) -> bool:
        t = self.task_of(rnd)
        return rnd == (self.cfg.fed.rounds if t == self.c.tasks - 1 else (t + 1) * self.c.rounds_per_task)

    # ---- client side
    def fit(self, fw, rnd: int, msg, state: dict | None, link, rows):
        """``fw.fit`` on the client's rows (``rows``: all its private rows) of this round's task
        and its replay memory; at the task's last round the client then keeps that task's
        replay rows or Fisher."""
        cid = rows.cid
        state = dict(state or {})
        mine = state.pop(KEY, {"memory": [], "ewc": []})
        t = self.task_of(rnd)
        task_rows = rows_in(rows.labels, self.groups[t])
        fitted = rows.subset(task_rows + [int(i) for kept in mine["memory"] for i in kept])
        self.past = mine["ewc"] if self.c.method == "ewc" else []
        try:
            result = fw.fit(rnd, cid, msg, state or None, link, rows=fitted)
        finally:
            self.past = []
        result.metrics.update(task=t, task_rows=len(task_rows), replay_rows=len(fitted) - len(task_rows))
        if self.is_task_end(rnd) and t < self.c.tasks - 1:
            mine = self.close_task(fw, rows, task_rows, t, mine, link, result.metrics)
        result.state = {**(result.state or {}), KEY: mine}
        return result

    def close_task(self, fw, rows: Any, task_rows: list[int], t: int, mine: dict, link, metrics: dict) -> dict:
        """What the client keeps of task ``t`` (``task_rows``: which of its ``rows`` are that task's)."""
        if self.c.method == "replay":
            rng = random.Random(derive_seed(self.cfg.seed, "replay", rows.cid, t))
            kept = sorted(rng.sample(task_rows, min(self.c.replay_per_task, len(task_rows))))
            return {**mine, "memory": mine["memory"] + [torch.tensor(kept, dtype=torch.long)]}
        if self.c.method == "ewc":
            task = rows.subset(task_rows)
            fisher, anchor, flops = self.fisher(fw, task.ids, task.labels, link)
            metrics["client_flops_fisher"] = flops
            metrics["client_flops"] = metrics.get("client_flops", 0) + flops
            return {**mine, "ewc": mine["ewc"] + [{"fisher": fisher, "anchor": anchor}]}
        return mine

    @staticmethod
    def fisher(fw, ids: list[list[int]], labels: list, link) -> tuple[State, State, int]:
        """The empirical diagonal Fisher of the tunable parameters, mean over the rows of the
        squared gradient of each row's loss (one row per backward pass), and the parameters
        -> (Fisher, anchor, FLOPs). In eval mode: dropout would add noise to F."""
        ctx, d = fw.ctx, fw.cfg.data
        params = {n: p for n, p in fw.tunable_module().named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        ctx.model.eval()
        flops = 0
        rows = datalib.batches(ids, labels, 1, ctx.tokenizer.pad_token_id, d.padding, d.max_length)
        for step, batch in enumerate(rows):
            for p in params.values():
                p.grad = None
            flops += fw.loss_grad(batch.to(ctx.device), link, step)
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
        for p in params.values():
            p.grad = None
        fisher = {n: (f / max(len(rows), 1)).cpu() for n, f in fisher.items()}
        return fisher, {n: p.detach().cpu().clone() for n, p in params.items()}, flops

    def local_rule(self, params: dict[str, torch.nn.Parameter]) -> EWC | None:
        """The fitting client's EWC term (None before its first task ends and for other methods)."""
        return EWC(params, self.past, self.c.ewc_lambda) if self.past else None

    # ---- server side
    @torch.no_grad()
    def evaluate(self, fw, rnd: int) -> dict[str, Any]:
        """The global model's accuracy on each task's test rows (the model is loaded by the caller)."""
        ctx, d = fw.ctx, fw.cfg.data
        test, ids = ctx.data.test, ctx.ids["test"]
        accs = []
        for group in self.groups:
            rows = rows_in(test.labels, group)
            batches = datalib.batches([ids[i] for i in rows], [test.labels[i] for i in rows],
                                      fw.cfg.train.eval_batch_size, ctx.tokenizer.pad_token_id, d.padding, d.max_length)
            accs.append(ctx.task.evaluate(ctx.model, batches, ctx.device)["accuracy"])
        return {"task": self.task_of(rnd), "task_accuracy": accs, "task_end": self.is_task_end(rnd)}


def make(cfg, fed: datalib.FedData) -> Continual | None:
    return Continual(cfg, fed) if cfg.continual.tasks > 1 else None
