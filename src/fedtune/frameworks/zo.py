"""Zeroth-order federated tuning with shared seeds (FedKSeed: Qin et al., ICML 2024,
"Federated full-parameter tuning of billion-sized language models with communication cost
under 18 kilobytes").

Server and clients share K candidate seeds (``zo.seeds``; candidate j's seed is derived from
the run seed, so nothing has to be sent to agree on them) and the initial state w0 of the
tuned parameters (``zo.params``: ``tunable`` = LoRA + head, or ``all`` = every parameter).
One round:

  down  the aggregated history: one pair (seed index j, accumulated projected gradient G_j)
        for every candidate used so far, at most K pairs whatever the number of rounds
  c1    the client rebuilds the global model from w0:  w = w0 - lr * sum_j G_j z_j
        (z_j ~ N(0, I) regenerated from seed j; pairs replayed in seed-index order, so every
        client and the server rebuild bitwise the same model)
  c2    ``zo.steps`` local steps, each on the next batch of the client's rows: pick j
        uniformly from the K candidates, g = (L(w + eps z_j) - L(w - eps z_j)) / (2 eps)
        (two forward passes, dropout off so both see the same function), w -= lr * g * z_j
  up    the (j, g) pairs in step order: 8 bytes a step
  agg   G_j += sum over clients of (n_i / sum n) * (client i's g with seed j): the clients'
        models averaged by sample count, as FedAvg does and as the authors' code does by default

Replay is exact: a step restores w from a saved copy after the two evaluations (instead of
MeZO's in-place "+eps, -2eps, +eps", which drifts in float arithmetic) and updates with the g
it uploads (rounded to float32 first), so replaying a client's uploaded pairs from the
round's global model reproduces its model bitwise (tests/test_zo.py). The price is two
extra copies of the tuned parameters (w and z) in memory: 2 x 4 x P bytes.

The client's FLOPs (``client_flops``), P = number of tuned parameters:
  forward       2 x the forward FLOPs of the batch per step (metering.FlopModel, train=False);
                no backward pass, no activations kept for one, no optimizer state
  step updates  per step: generating z (Z_FLOPS per value), w + eps z and w - eps z (2P each),
                w - lr g z (2P): (Z_FLOPS + 6) x P
  replay        per replayed pair: generating z and w - lr G z: (Z_FLOPS + 2) x P
Generating a normal value is counted as Z_FLOPS = 4 floating-point operations (Box-Muller:
a log, a square root, a sine or cosine and a product per value); the integer bit generator
is not floating-point work and is not counted. ``client_replay_seconds`` reports the replay's
wall time beside it, since it is memory-bound work that FLOPs undersell."""

from __future__ import annotations

import random
import time
import weakref
from typing import Callable

import torch
from torch import nn

from ..wire import Message
from ..training import derive_seed
from .base import ClientResult, Context, Framework

Z_FLOPS = 4  # floating-point operations counted per generated normal value (see above)

# The common initial state, one copy per model: in simulation the server and the clients'
# framework objects share one model, and whichever is built first sees it untouched.
_INITIAL: "weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- the math


def zo_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The tuned parameters in a fixed order: ``tunable`` (LoRA + head) or ``all``."""
    if which == "tunable":
        return [p for p in model.parameters() if p.requires_grad]
    # peft keeps an unused copy of a head it trains ("original_module"): it never runs.
    return [p for n, p in model.named_parameters() if "original_module" not in n]


def direction(seed: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """z ~ N(0, I) over ``params``, from ``seed`` alone: generated on the CPU so that every
    party, whatever its device, regenerates the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=params[0].dtype)
    return [z.view_as(p).to(p.device) for z, p in zip(flat.split([p.numel() for p in params]), params)]


@torch.no_grad()
def shift(params: list[torch.Tensor], z: list[torch.Tensor], alpha: float) -> None:
    """params += alpha * z"""
    for p, zi in zip(params, z):
        p.add_(zi, alpha=alpha)


@torch.no_grad()
def restore(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def as_float32(x: float) -> float:
    """The value the wire carries, so the sender updates with exactly what it sends."""
    return torch.tensor(x, dtype=torch.float32).item()


@torch.no_grad()
def zo_step(params: list[torch.Tensor], z: list[torch.Tensor], loss: Callable[[], torch.Tensor],
            eps: float, lr: float) -> tuple[float, float, float]:
    """One two-point step along z -> (projected gradient g, L(w + eps z), L(w - eps z));
    afterwards params = w - lr * g * z, computed from an exact copy of w."""
    saved = [p.clone() for p in params]
    shift(params, z, eps)
    plus = loss().item()
    restore(params, saved)
    shift(params, z, -eps)
    minus = loss().item()
    restore(params, saved)
    g = as_float32((plus - minus) / (2 * eps))
    shift(params, z, -lr * g)
    return g, plus, minus


def replay(params: list[torch.Tensor], seeds: list[int], grads: list[float], lr: float) -> None:
    """Apply the pairs in order: params -= lr * g * z(seed), as the steps that made them did."""
    for seed, g in zip(seeds, grads):
        shift(params, direction(seed, params), -lr * g)


# --------------------------------------------------------------------------- the framework


class ZOFramework(Framework):
    name = "zo"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        zo = self.cfg.zo
        self.params = zo_parameters(ctx.model, zo.params)
        self.numel = sum(p.numel() for p in self.params)
        if ctx.model not in _INITIAL:
            _INITIAL[ctx.model] = [p.detach().clone() for p in self.params]
        self.init = _INITIAL[ctx.model]
        self.candidates = [derive_seed(self.cfg.seed, "zo-seed", j) for j in range(zo.seeds)]
        # The server's whole memory: G_j per candidate, in float64 so that many rounds of
        # small sums do not lose the late ones.
        self.pool = torch.zeros(zo.seeds, dtype=torch.float64)
        self.built: torch.Tensor | None = None  # the pool the server last rebuilt the model from
        self.global_values: list[torch.Tensor] = []  # ... and the model it got

    # ---- shared by server and clients
    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The aggregated pairs as sent: (seed indices, float32 G), seed-index order."""
        used = self.pool.nonzero().flatten()
        return used.to(torch.int32), self.pool[used].to(torch.float32)

    def rebuild(self, index: torch.Tensor, grads: torch.Tensor) -> int:
        """c1: the global model from w0 and the aggregated pairs -> FLOPs spent."""
        restore(self.params, self.init)
        replay(self.params, [self.candidates[j] for j in index.tolist()], grads.tolist(), self.cfg.zo.lr)
        return len(index) * (Z_FLOPS + 2) * self.numel

    # ---- server side
    def configure(self, rnd, cid):
        index, grads = self.history()
        return Message({"seed": index, "grad": grads})

    def check(self, msg: Message) -> str | None:
        """Why an upload cannot enter the pool (None: it can). One bad pair would poison every
        later model, since every client replays the whole history."""
        seed, grad = msg.tensors.get("seed"), msg.tensors.get("grad")
        if seed is None or grad is None or seed.dim() != 1 or seed.shape != grad.shape:
            return "the upload is not a list of (seed, grad) pairs"
        if len(seed) and (int(seed.min()) < 0 or int(seed.max()) >= len(self.candidates)):
            return f"seed indices outside [0, {len(self.candidates)})"
        if not torch.isfinite(grad).all():
            return "projected gradients hold NaN or inf"
        return None

    def aggregate(self, rnd, results):
        rejected = {str(cid): why for cid, (msg, _) in results.items() if (why := self.check(msg))}
        kept = [(msg, metrics) for cid, (msg, metrics) in results.items() if str(cid) not in rejected]
        record = {"rejected": rejected} if rejected else {}
        if self.central_dp:
            record.update(self.add_private(kept))
        else:
            total = sum(metrics["num_samples"] for _, metrics in kept)
            for msg, metrics in kept:  # sampled order: the same sums on every runtime
                weight = metrics["num_samples"] / total
                self.pool.index_add_(0, msg.tensors["seed"].long(), msg.tensors["grad"].double() * weight)
        return {**record, "zo_seeds_used": int(self.pool.count_nonzero()), "server_flops": self.build_global()}

    def add_private(self, kept: list) -> dict:
        """privacy.central_dp: the pool is all the server releases and the model is a function of it
        (the seeds are public), so DP-FedAvg runs on each client's round contribution in seed space,
        v_i[j] = the sum of its g with seed j: clipped, summed, noised in all K coordinates (which seeds
        were touched would tell who joined) and divided by the expected clients a round."""
        zero = torch.zeros_like(self.pool)
        contributions = [({"pool": zero.clone().index_add_(0, msg.tensors["seed"].long(), msg.tensors["grad"].double())},
                          1.0) for msg, _ in kept]
        [(mean, _)], record = self.central_dp.privatize({"pool": zero}, contributions)
        self.pool += mean["pool"]
        return record

    def build_global(self) -> int:
        """The server's own c1, once per round -> FLOPs."""
        flops = self.rebuild(*self.history())
        self.built, self.global_values = self.pool.clone(), [p.detach().clone() for p in self.params]
        return flops

    def global_model(self):
        if self.built is None or not torch.equal(self.built, self.pool):
            self.build_global()
        else:  # clients may have used the shared model since (simulation): put the global back
            restore(self.params, self.global_values)
        return self.ctx.model

    # ---- client side
    def local_batches(self, rnd: int, cid: int, rows=None) -> list:
        """``zo.steps`` batches, cycling through reshuffled passes over the client's rows;
        with zo.steps = 0, train.local_epochs passes, one step per batch."""
        steps, local_epochs = self.cfg.zo.steps, self.cfg.train.local_epochs
        out, epoch = [], 0
        while (len(out) < steps) if steps else (epoch < local_epochs):
            out += self.ctx.client_batches(rnd, cid, epoch, rows=rows)
            epoch += 1
        return out[:steps] if steps else out

    def fit(self, rnd, cid, msg, state, link, rows=None):
        ctx, zo = self.ctx, self.cfg.zo
        rows = ctx.client_rows(cid) if rows is None else rows
        start = time.perf_counter()
        replay_flops = self.rebuild(msg.tensors["seed"], msg.tensors["grad"])  # c1
        replay_seconds = time.perf_counter() - start
        pick = random.Random(derive_seed(self.cfg.seed, "zo-pick", rnd, cid))
        batches = self.local_batches(rnd, cid, rows)
        seeds, grads, losses, forward_flops = [], [], [], 0
        ctx.model.eval()  # no dropout: the two evaluations must differ only by the perturbation
        for i, batch in enumerate(batches):  # c2
            batch = batch.to(ctx.device)
            j = pick.randrange(zo.seeds)
            z = direction(self.candidates[j], self.params)
            g, plus, minus = zo_step(self.params, z, lambda b=batch: ctx.task.loss(ctx.model, b), zo.eps, zo.lr)
            seeds.append(j)
            grads.append(g)
            losses.append((plus + minus) / 2)
            forward_flops += 2 * ctx.task.flops(ctx.flops, batch, train=False)
            if ctx.on_step:
                ctx.on_step(i + 1, len(batches))
        step_flops = len(batches) * (Z_FLOPS + 6) * self.numel
        metrics = {
            "train_loss": sum(losses) / max(len(losses), 1),
            "num_samples": len(rows),
            "client_flops": forward_flops + step_flops + replay_flops,
            "client_flops_forward": forward_flops,
            "client_flops_steps": step_flops,
            "client_flops_replay": replay_flops,
            "client_replay_seconds": replay_seconds,
            "zo_steps": len(batches),
            "zo_pairs_down": len(msg.tensors["seed"]),
            "zo_params": self.numel,
        }
        up = Message({"seed": torch.tensor(seeds, dtype=torch.int32), "grad": torch.tensor(grads, dtype=torch.float32)})
        return ClientResult(up, None, metrics)

    # ---- checkpointing: the pool is everything the server knows
    def state_dict(self):
        state = {"pool": self.pool.clone()}
        if self.central_dp:
            state["central_dp"] = self.central_dp.state_dict()
        return state

    def load_state_dict(self, state):
        self.pool = state["pool"].clone()
        self.built = None
        if self.central_dp:
            self.central_dp.load_state_dict(state["central_dp"])
