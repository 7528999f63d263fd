"""KD-FedLLM: clients share knowledge as their outputs on a public dataset instead of weights
(paper steps b1-b8). One exchange per round:

  down  the server's outputs on the public set from the previous round (nothing in round 1)
  b8+b1 the client trains its own local model (kept across rounds as its state) on its private
        rows and, from round 2, distils the server's outputs in the same pass (below)
  b2-b3 outputs on the public set, compressed, uploaded
  b4    server: check each upload, turn them into one distribution per public row (mean,
        weighted by client samples, or mean with entropy filtering)
  b5    server: distil that into the global model (KL at temperature T)
  b6-b7 server: the global model's outputs on the public set, sent next round

The client's schedule (b8 with b1). Each local epoch is ONE pass that walks the private rows in
batches of ``train.batch_size`` and the public rows, shuffled, in as many equal slices as there
are private batches; every step minimises

    (1 - lambda) * CE(private batch) + lambda * KD(public slice),   lambda = kd.client_kd_weight

so an epoch sees every private row and every public row exactly once, and the teacher never
trains the local model alone: a separate distillation pass before local training (the paper's
order) pulled clients that had barely learned back to the server's near-uniform outputs, and
they stopped learning on datasets with few rows per class. Without a teacher (round 1, or
lambda = 0) a step is plain CE, as under fedavg.

Confidence weighting (``kd.confidence_weighting``, off by default): a public row teaches with
weight 1 - H(p) / ln(width), where p is the teacher's own prediction (its distribution at T = 1),
so a uniform teacher teaches nothing and a one-hot teacher teaches fully; on the client's
teacher (the server's outputs) and on the server's (the clients' merged outputs) alike. It is
off by default because it cost accuracy in every setting measured (docs/kd.md): the mixed pass
alone keeps the clients learning, and down-weighting an unsure but right teacher slows them.

A "row" is one example under classify and one answer token under generate (tasks.py), so
the payload is rows x labels or rows x vocabulary. Dense payloads carry logits (quantized);
top-k payloads carry the k largest probabilities at temperature T, and the receiver keeps the
remaining mass as one rest bucket (kd.topk_tail = "bucket", kd_loss) or spreads it evenly over
the other entries ("uniform"); over a vocabulary the spread tail is learned as if it were sent.

The paper's research directions (kd_directions.py, docs/kd.md) hook in here: ``kd.align`` adds
the client's label histogram to its upload and weights the server's rows (aggregate, align);
``kd.public_per_round`` makes every public pass run on the round's selected examples, whose ids
travel down with the knowledge (selection, next_knowledge); ``kd.logit_rank`` is one more
encoding (encode_outputs); ``kd.aggregation = "cluster"`` is one more b4."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import zip_longest

import torch
import torch.nn.functional as F

from .. import data as datalib
from ..data import Batch
from .. import models
from ..compression import dequantize, quantize, topk_decode_buckets, topk_decode_distribution, topk_encode
from ..config import KDConfig
from ..errors import FedtuneError
from ..privacy import attacks, dp_sgd
from ..privacy import outputs as privacy_outputs
from ..strategies import lora
from ..wire import Message
from ..training import derive_seed, make_optimizer, seeded, train_pass
from . import kd_directions as directions
from .base import ClientResult, Context, Framework

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the math


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || softmax(student / T)), averaged over rows. With ``weight``, row i
    counts w_i * KL_i and the mean is over the rows with w_i > 0: a dropped row (0) is left out,
    and a row of weight 0.2 teaches a fifth of a full one, so low weights everywhere mean a
    small loss, not a renormalised one. The T^2 keeps the gradient's scale independent of T
    (Hinton et al., 2015).

    A teacher one column wider than the student is a top-k teacher in buckets
    (compression.topk_decode_buckets): the KL is over its nonzero entries and one rest bucket,
    whose student probability is the student's mass on every other entry, so the student is
    asked to match the kept probabilities and the total left over, not any shape of its tail."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_probs.shape[-1] == log_q.shape[-1] + 1:
        kept, rest = teacher_probs[..., :-1], teacher_probs[..., -1]
        sent = kept > 0
        # a row with every entry sent has an empty rest: keep its logsumexp finite (NaN-free gradient)
        log_q_rest = torch.logsumexp(log_q.masked_fill(sent & ~sent.all(-1, keepdim=True), float("-inf")), dim=-1)
        rest_term = torch.where(rest > 0, torch.xlogy(rest, rest) - rest * log_q_rest, torch.zeros_like(rest))
        kl = (torch.xlogy(kept, kept) - kept * log_q).sum(-1) + rest_term
    else:
        kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum(-1)
    if weight is None:
        return temperature**2 * kl.mean()
    return temperature**2 * (kl * weight).sum() / (weight > 0).sum().clamp_min(1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row, in nats."""
    return -torch.xlogy(probs, probs).sum(-1)


def confidence(probs: torch.Tensor) -> torch.Tensor:
    """1 - H(p) / ln(width) per row: 0 for a uniform distribution, 1 for a one-hot one."""
    return (1 - entropy(probs.double()) / math.log(probs.shape[-1])).clamp(0, 1).float()


def refine(probs: list[torch.Tensor], weights: list[float], cfg: KDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """b4: the clients' distributions -> (global distribution per row, rows kept)."""
    w = torch.tensor(weights if cfg.aggregation == "weighted" else [1.0] * len(probs), dtype=torch.float64)
    mean = sum(p.double() * wi for p, wi in zip(probs, w)) / w.sum()
    mean = mean.float()
    keep = torch.ones(len(mean), dtype=torch.bool)
    if cfg.aggregation == "entropy":
        keep = entropy(mean) <= cfg.entropy_threshold
    return mean, keep


def encode_outputs(logits: torch.Tensor, cfg: KDConfig) -> dict[str, torch.Tensor]:
    if cfg.logit_rank:
        return directions.lowrank_encode(logits, cfg.logit_rank, cfg.logit_dtype)
    if cfg.logit_topk:
        return topk_encode(F.softmax(logits.float() / cfg.temperature, dim=-1), cfg.logit_topk, cfg.logit_dtype)
    return quantize(logits.float(), cfg.logit_dtype)


def decode_outputs(t: dict[str, torch.Tensor], cfg: KDConfig, rows: int, width: int) -> torch.Tensor:
    """Payload -> probabilities at temperature T, (rows, width), or (rows, width + 1) for top-k
    under ``kd.topk_tail = "bucket"`` (the last column is the mass not sent). Raises FedtuneError with the
    reason when the payload is malformed (wrong names or shape, NaN, inf, indices out of range)."""
    if cfg.logit_rank:
        return _decode_lowrank(t, cfg, rows, width)
    need = ["values"] + (["index", "width"] if cfg.logit_topk else []) + (["scale"] if cfg.logit_dtype == "int8" else [])
    missing = [k for k in need if k not in t]
    if missing:
        raise FedtuneError(f"payload lacks {', '.join(missing)}")
    cols = min(cfg.logit_topk, width) if cfg.logit_topk else width
    for key in ("values", "index"):
        if key in t and tuple(t[key].shape) != (rows, cols):
            raise FedtuneError(f"{key} has shape {tuple(t[key].shape)}, expected {(rows, cols)}")
    if "scale" in t and tuple(t["scale"].shape) != (rows, 1):
        raise FedtuneError(f"scale has shape {tuple(t['scale'].shape)}, expected {(rows, 1)}")
    values = dequantize(t)
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).any(-1).sum())
        raise FedtuneError(f"values hold NaN or inf in {bad} rows")
    if not cfg.logit_topk:
        return F.softmax(values / cfg.temperature, dim=-1)
    if int(t["width"][0]) != width or int(t["index"].min()) < 0 or int(t["index"].max()) >= width:
        raise FedtuneError(f"top-k indices or width do not fit {width} outputs")
    if (values < 0).any() or (values.sum(-1) > 1.05).any():
        raise FedtuneError("top-k values are not probabilities")
    probs = topk_decode_buckets(t) if cfg.topk_tail == "bucket" else topk_decode_distribution(t)
    return probs / probs.sum(-1, keepdim=True)  # int8 rounding can leave the sum slightly off 1


def _decode_lowrank(t: dict[str, torch.Tensor], cfg: KDConfig, rows: int, width: int) -> torch.Tensor:
    need = [f"{p}{k}" for p in ("coef_", "basis_") for k in ("values",) + (("scale",) if cfg.logit_dtype == "int8" else ())]
    missing = [k for k in need if k not in t]
    if missing:
        raise FedtuneError(f"payload lacks {', '.join(missing)}")
    k = t["coef_values"].shape[-1] if t["coef_values"].dim() == 2 else -1
    if not 1 <= k <= min(cfg.logit_rank, rows, width) or tuple(t["coef_values"].shape) != (rows, k) \
            or tuple(t["basis_values"].shape) != (k, width):
        raise FedtuneError(f"low-rank code has shapes {tuple(t['coef_values'].shape)} and "
                           f"{tuple(t['basis_values'].shape)}, expected ({rows}, k) and (k, {width}) with "
                           f"k <= {min(cfg.logit_rank, rows, width)}")
    logits = directions.lowrank_decode(t)
    if not torch.isfinite(logits).all():
        raise FedtuneError(f"values hold NaN or inf in {int((~torch.isfinite(logits)).any(-1).sum())} rows")
    return F.softmax(logits / cfg.temperature, dim=-1)


# --------------------------------------------------------------------------- the framework


@dataclass
class Step:
    """One step of a client's pass: a private batch and, when distilling, a slice of public rows."""

    private: Batch
    public: Batch | None = None

    def to(self, device) -> "Step":
        return Step(self.private.to(device), None if self.public is None else self.public.to(device))


class KDFramework(Framework):
    name = "kd"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        public, test = ctx.data.public, ctx.data.test
        if not len(public):
            raise FedtuneError("kd needs a public dataset: set data.public_size > 0")
        shared = set(public.texts) & set(test.texts)
        if shared:
            raise FedtuneError(
                f"the public set shares {len(shared)} texts with the test set (e.g. {sorted(shared)[0]!r}); "
                f"the server model would be tested on what it learned from: remove them from the data"
            )
        self.init_state = models.get_tunable(ctx.model)
        # model.client_ranks: nothing is aggregated, so a rank is each party's own. The model is
        # built at the largest rank; a rank-r state is held zero-padded, which trains exactly a
        # rank-r adapter (strategies/lora.py). The server's model has rank model.lora_r.
        self.shapes = {k: v.shape for k, v in self.init_state.items()}
        self.global_state = self.padded(lora.resize(self.init_state, self.cfg.model.lora_r))
        self.knowledge: dict[str, torch.Tensor] = {}  # what configure sends: the last b6 outputs
        self.scores: torch.Tensor | None = None  # kd.select's score per public example (none yet: random)
        # Where each public example's rows sit in the payload.
        counts = torch.tensor(ctx.task.rows_per_example(public.labels))
        self.row_count, self.row_start = counts, torch.cumsum(counts, 0) - counts
        self.rows = int(counts.sum())
        with torch.no_grad():
            first = ctx.batches("public", public.labels, 1, limit=1)[0].to(ctx.device)
            ctx.model.eval()
            self.width = ctx.task.outputs(ctx.model, first).shape[-1]

    # ---- helpers shared by client and server
    def client_rank(self, cid: int) -> int:
        return self.cfg.model.client_ranks[cid] if self.cfg.model.client_ranks else self.cfg.model.lora_r

    def padded(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return lora.fit_to(state, self.shapes)

    def decode(self, tensors, rows: int | None = None):
        return decode_outputs(tensors, self.cfg.kd, self.rows if rows is None else rows, self.width)

    def selection(self, rnd: int) -> torch.Tensor:
        """The public examples round ``rnd`` uses and sends (kd.public_per_round; 0 = all)."""
        return directions.select_examples(len(self.row_count), self.cfg.kd.public_per_round, self.scores,
                                          self.cfg.seed, rnd)

    def full(self, rows: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
        """A distribution per public row: ``sub`` on ``rows``, uniform (never used) elsewhere."""
        out = torch.full((self.rows, sub.shape[-1]), 1.0 / sub.shape[-1])
        out[rows] = sub.float()
        return out

    def public_batches(self, examples: torch.Tensor, size: int, seed: int | None = None) -> list[Batch]:
        """Batches of the given public examples; a batch's ``index`` is a position in ``examples``."""
        ctx, d = self.ctx, self.cfg.data
        ex = examples.tolist()
        return datalib.batches([ctx.ids["public"][i] for i in ex], [ctx.data.public.labels[i] for i in ex], size,
                               ctx.tokenizer.pad_token_id, d.padding, d.max_length, seed)

    def weights(self, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Each public row's distillation weight: kept or not, times the teacher's confidence in
        its own prediction (at T = 1: softmax(z / T)^T is proportional to softmax(z))."""
        if not self.cfg.kd.confidence_weighting:
            return keep.float()
        own = teacher.double() ** self.cfg.kd.temperature
        return keep.float() * confidence(own / own.sum(-1, keepdim=True))

    def rows_of(self, examples: torch.Tensor) -> torch.Tensor:
        starts, counts = self.row_start[examples], self.row_count[examples]
        offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return torch.repeat_interleave(starts, counts) + offset

    def public_kd_loss(self, model, batch: Batch, examples: torch.Tensor, teacher: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
        """KD loss of a batch of public examples; ``examples`` maps the batch's index to public examples."""
        rows = self.rows_of(examples[batch.index.cpu()])
        out = self.ctx.task.outputs(model, batch)
        return kd_loss(out, teacher[rows].to(out.device), self.cfg.kd.temperature, weight[rows].to(out.device))

    @torch.no_grad()
    def public_outputs(self, examples: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """b2 / b6: the current model's outputs on the public examples (all by default) -> (their
        rows x width, FLOPs)."""
        ctx, out, flops = self.ctx, [], 0
        examples = torch.arange(len(self.row_count)) if examples is None else examples
        ctx.model.eval()
        for batch in self.public_batches(examples, self.cfg.train.eval_batch_size):
            out.append(ctx.task.outputs(ctx.model, batch.to(ctx.device)).float().cpu())
            flops += ctx.task.flops(ctx.flops, batch, train=False)
        return torch.cat(out), flops

    def distil(self, teacher: torch.Tensor, weight: torch.Tensor, epochs: int, lr: float, head_lr: float,
               *seed) -> tuple[float, int]:
        """b5: fit the current model to ``teacher`` on the public examples with a row of weight > 0."""
        ctx, cfg = self.ctx, self.cfg
        example_of_row = torch.repeat_interleave(torch.arange(len(self.row_count)), self.row_count)
        kept_rows = torch.zeros(len(self.row_count)).index_add_(0, example_of_row, (weight > 0).float())
        kept_examples = kept_rows.nonzero().flatten().tolist()
        if not kept_examples or not epochs:
            return 0.0, 0
        ids = [ctx.ids["public"][i] for i in kept_examples]
        labels = [ctx.data.public.labels[i] for i in kept_examples]
        back = torch.tensor(kept_examples)
        optimizer = make_optimizer(ctx.model, cfg.train, lr, head_lr)
        loss, flops = 0.0, 0
        for epoch in range(epochs):
            batches = datalib.batches(ids, labels, cfg.train.batch_size, ctx.tokenizer.pad_token_id, cfg.data.padding,
                                      cfg.data.max_length, derive_seed(cfg.seed, *seed, epoch))
            loss, f = train_pass(ctx.model, batches, cfg.train, ctx.device, ctx.flops,
                                 lambda m, b: self.public_kd_loss(m, b, back, teacher, weight), optimizer,
                                 ctx.on_step, lambda b: ctx.task.flops(ctx.flops, b, True))
            flops += f
        return loss, flops

    # ---- server side
    def configure(self, rnd, cid):  # b7: last round's global outputs (none in round 1) on this round's rows
        ids = {"public_ids": self.selection(rnd).to(torch.int32)} if self.cfg.kd.public_per_round else {}
        return Message({**self.knowledge, **ids})

    def aggregate(self, rnd, results):
        cfg, ctx = self.cfg, self.ctx
        examples = self.selection(rnd)  # the public examples this round's uploads cover
        rows = self.rows_of(examples)
        probs, weights, hists, cids, rejected = [], [], [], [], {}
        for cid in sorted(results):
            msg, metrics = results[cid]
            try:
                p = self.decode(msg.tensors, len(rows))  # b4 starts by checking each upload
                hist = self.label_histogram(msg.tensors) if cfg.kd.align else None
            except FedtuneError as exc:
                rejected[str(cid)] = str(exc)
                log.warning("round %d: rejected client %s's upload: %s", rnd, cid, exc)
                continue
            probs.append(p)
            hists.append(hist)
            cids.append(cid)
            weights.append(float(metrics.get("num_samples", 1)))
        record = {"rejected": rejected} if rejected else {}
        if not probs:  # nothing usable: the global model stays as it was
            models.set_tunable(ctx.model, self.global_state)
            flops = self.next_knowledge(rnd, record)  # next round's rows may differ from this round's
            return {**record, "kd_rows_kept": 0, "server_flops": flops}
        if cfg.kd.aggregation == "cluster":
            sub, assign = directions.cluster_refine(probs, cfg.kd.clusters)
            keep_sub = torch.ones(len(rows), dtype=torch.bool)
            record["kd_clusters"] = {str(c): a for c, a in zip(cids, assign)}
        else:
            sub, keep_sub = refine(probs, weights, cfg.kd)
        if cfg.kd.select == "disagreement":  # scored now, ranked when the next round's rows are chosen
            if self.scores is None:
                self.scores = torch.full((len(self.row_count),), float("nan"), dtype=torch.float64)
            self.scores[examples] = directions.per_example(directions.disagreement(probs), self.row_count[examples])
        teacher = self.full(rows, sub)
        keep = torch.zeros(self.rows, dtype=torch.bool)
        keep[rows] = keep_sub
        weight = self.weights(teacher, keep)
        if cfg.kd.align:
            weight[rows] *= self.align(examples, sum(hists), record)
        models.set_tunable(ctx.model, self.global_state)
        head_lr = cfg.kd.server_lr * cfg.train.head_lr / cfg.train.lr  # the head keeps its faster rate
        with seeded(cfg.seed, "server-kd", rnd):  # b5
            loss, distil_flops = self.distil(teacher, weight, cfg.kd.server_epochs, cfg.kd.server_lr, head_lr,
                                             "server-kd", rnd)
        self.global_state = models.get_tunable(ctx.model)
        out_flops = self.next_knowledge(rnd, record)
        return {**record, "server_kd_loss": loss, "kd_rows": self.rows, "kd_rows_kept": int(keep.sum()),
                "server_kd_confidence": float(weight[keep].mean()) if keep.any() else 0.0,
                "server_flops": distil_flops + out_flops}

    def next_knowledge(self, rnd: int, record: dict) -> int:
        """b6: the global model's outputs on all public rows, when the clients distil them or
        kd.select=entropy ranks by them; what is sent is next round's selected rows, encoded.
        -> the FLOPs spent."""
        cfg = self.cfg.kd
        if not (cfg.client_kd_weight or cfg.select == "entropy"):
            return 0
        outputs, flops = self.public_outputs()
        if cfg.select == "entropy":
            self.scores = directions.per_example(entropy(F.softmax(outputs, -1)), self.row_count)
        if cfg.client_kd_weight:
            sent = outputs[self.rows_of(self.selection(rnd + 1))]
            self.knowledge = encode_outputs(sent, cfg)
            if cfg.logit_rank:
                record["server_logit_rank_error"] = directions.lowrank_error(sent, self.knowledge)
        return flops

    def label_histogram(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        hist = tensors.get("label_hist")
        n = self.ctx.data.num_labels
        if hist is None or tuple(hist.shape) != (n,) or hist.is_floating_point() or (hist < 0).any():
            raise FedtuneError(f"kd.align needs a label_hist of {n} non-negative integers")
        return hist.long()

    def align(self, examples: torch.Tensor, pooled: torch.Tensor, record: dict) -> torch.Tensor:
        """kd.align: each selected public row's weight, w = p_clients(y) / p_public(y) (per example,
        repeated over its rows). The server owns the public set, labels included, and uses them here."""
        labels = [self.ctx.data.public.labels[i] for i in examples.tolist()]
        w = directions.align_weights(pooled, labels, self.cfg.kd.align_clip)
        public = directions.label_histogram(labels, self.ctx.data.num_labels)
        record["kd_align_tv"] = directions.total_variation(pooled, public)  # the shift the weights undo
        record["kd_align_rows_kept"] = int((w > 0).sum())
        return torch.repeat_interleave(w, self.row_count[examples])

    # ---- client side
    def client_steps(self, rnd: int, cid: int, epoch: int, distilling: bool,
                     examples: torch.Tensor | None = None) -> list[Step]:
        """One epoch: the private batches, each paired (when distilling) with an equal slice of
        the shuffled public examples (this round's selection; all by default), so the pass covers
        both sets once."""
        ctx = self.ctx
        private = ctx.client_batches(rnd, cid, epoch)
        if not distilling:
            return [Step(b) for b in private]
        examples = torch.arange(len(self.row_count)) if examples is None else examples
        size = -(-len(examples) // max(len(private), 1))  # ceil: at most one slice per private batch
        public = self.public_batches(examples, size, derive_seed(self.cfg.seed, "client-kd", rnd, cid, epoch))
        return [Step(b, pb) for b, pb in zip_longest(private, public)]

    def client_train(self, rnd: int, cid: int, teacher: torch.Tensor | None,
                     examples: torch.Tensor | None = None, dp=None) -> dict:
        """b8 + b1: ``train.local_epochs`` mixed passes -> the last epoch's mean CE and KD, and
        the FLOPs of the private and the public rows' forward and backward passes. ``dp``
        (privacy.dp_sgd): each step's CE gradient is DP-SGD's (per-example clip and noise) and
        its KD gradient on the public slice is added as is (privacy/dp_sgd.private_step)."""
        ctx, cfg = self.ctx, self.cfg
        lam = cfg.kd.client_kd_weight
        every = torch.arange(len(self.row_count)) if examples is None else examples
        sent = torch.zeros(self.rows, dtype=torch.bool)
        sent[self.rows_of(every)] = True
        weight = self.weights(teacher, sent) if teacher is not None else None
        flops = {"train": 0, "kd": 0}
        rule = self.continual_rule()  # continual.method=ewc
        parts: dict[str, list[float]] = {}  # this epoch's CE and KD terms

        def loss_fn(model, step: Step):
            ce = ctx.task.loss(model, step.private)
            parts["ce"].append(ce.item())
            if teacher is None:
                return ce
            if step.public is None:
                return (1 - lam) * ce
            kd = self.public_kd_loss(model, step.public, every, teacher, weight)
            parts["kd"].append(kd.item())
            return (1 - lam) * ce + lam * kd

        def flop_fn(step: Step) -> int:
            f_train = ctx.task.flops(ctx.flops, step.private, True)
            f_kd = ctx.task.flops(ctx.flops, step.public, True) if step.public is not None else 0
            flops["train"] += f_train
            flops["kd"] += f_kd
            return f_train + f_kd

        def private_ce(model, batch: Batch):  # DP-SGD's per-example CE (one-row batches)
            ce = ctx.task.loss(model, batch)
            parts["ce"].append(ce.item())
            return ce

        def public_kd(model, step: Step):
            if teacher is None or step.public is None:
                return None
            kd = self.public_kd_loss(model, step.public, every, teacher, weight)
            parts["kd"].append(kd.item())
            return lam * kd

        for epoch in range(cfg.train.local_epochs):
            parts.update(ce=[], kd=[])  # the metrics are the last epoch's, as under fedavg
            steps = self.client_steps(rnd, cid, epoch, teacher is not None, every)
            if dp is None:
                train_pass(ctx.model, steps, cfg.train, ctx.device, ctx.flops, loss_fn, on_step=ctx.on_step,
                           flop_fn=flop_fn, on_grad=rule.on_grad if rule else None)
            else:  # config.validate keeps continual.method=ewc (rule) away from DP-SGD
                dp_sgd.train_pass(ctx.model, steps, cfg.train, ctx.device, ctx.flops, private_ce, dp,
                                  on_step=ctx.on_step, flop_fn=flop_fn, private_of=lambda step: step.private,
                                  public_loss=public_kd, weight=1.0 if teacher is None else 1 - lam)
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        out = {"train_loss": mean(parts["ce"]),
               "client_flops_train": flops["train"], "client_flops_kd": flops["kd"]}
        if teacher is not None:
            out["client_kd_loss"] = mean(parts["kd"])
            out["client_kd_confidence"] = float(weight[sent].mean())
        return out

    def client_accuracy(self) -> float:
        """The client's own model on the first ``kd.client_eval_size`` test rows (not protocol compute)."""
        ctx = self.ctx
        return ctx.task.evaluate(ctx.model, ctx.test_batches(limit=self.cfg.kd.client_eval_size), ctx.device)["accuracy"]

    def fit(self, rnd, cid, msg, state, link):
        ctx, cfg = self.ctx, self.cfg
        r = self.client_rank(cid)
        models.set_tunable(ctx.model, self.padded(state["tunable"] if state else lora.resize(self.init_state, r)))
        knowledge = {k: v for k, v in msg.tensors.items() if k != "public_ids"}
        examples = msg.tensors["public_ids"].long() if "public_ids" in msg.tensors else torch.arange(len(self.row_count))
        rows = self.rows_of(examples)
        teacher = self.full(rows, self.decode(knowledge, len(rows))) if knowledge and cfg.kd.client_kd_weight else None
        odp = privacy_outputs.for_client(cfg, len(ctx.data.clients[cid]), state)
        metrics: dict = {}
        if teacher is not None and cfg.kd.client_eval_size:  # so a teacher that hurts shows
            metrics["client_test_accuracy_before"] = self.client_accuracy()
        dp = dp_sgd.for_client(cfg, len(ctx.data.clients[cid]), state)
        metrics.update(self.client_train(rnd, cid, teacher, examples, dp))  # b8 + b1
        if dp:
            metrics.update(dp.record())
        outputs, public_flops = self.public_outputs(examples)  # b2: this round's public examples only
        if odp:  # clipped and noised before they leave the client (privacy.output_noise_multiplier)
            outputs = odp.outputs(outputs)
        if cfg.kd.client_eval_size:
            metrics["client_test_accuracy"] = self.client_accuracy()
        metrics.update(
            num_samples=len(ctx.data.clients[cid]), client_flops_public=public_flops,
            client_flops=metrics["client_flops_train"] + metrics["client_flops_kd"] + public_flops,
            **attacks.mark(cfg, cid), **(odp.record() if odp else {}),
        )
        # b3: upload the compressed outputs; keep the local model (and the accountant) for the next round
        kept = privacy_outputs.keep(odp, dp_sgd.keep(dp, {"tunable": lora.resize(models.get_tunable(ctx.model), r)}))
        up = encode_outputs(outputs, cfg.kd)
        if cfg.kd.logit_rank:
            metrics["logit_rank_error"] = directions.lowrank_error(outputs, up)
        if cfg.kd.align:  # the client's label histogram travels in the metered upload
            up["label_hist"] = directions.label_histogram(ctx.data.clients[cid].labels, ctx.data.num_labels)
        if cfg.kd.public_per_round:
            metrics["kd_public_examples"] = len(examples)
        return ClientResult(Message(up), kept, metrics)

    # ---- checkpointing
    def state_dict(self):
        return {**super().state_dict(), "knowledge": self.knowledge, "scores": self.scores}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.knowledge = state["knowledge"]
        self.scores = state.get("scores")  # checkpoints from before kd.select have none
