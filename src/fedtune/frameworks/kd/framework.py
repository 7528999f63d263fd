"""KD-FedLLM's framework: the exchange of one round (the package docstring), from the server's
side (configure, aggregate: b4-b7) and the client's (fit: b8, b1-b3). The choices the config
makes are objects picked from registries: the codec of what is sent (codecs.py), the refiner of
the clients' uploads (refiners.py), the selector of the public examples (selectors.py) and the
alignment of the server's rows (alignment.py)."""

from __future__ import annotations

import logging
from itertools import zip_longest

import torch

from ... import data as datalib
from ... import models
from ...data import Batch
from ...errors import FedtuneError
from ...privacy import dp_sgd
from ...privacy.guard import ClientGuard
from ...adapters import lora_state as lora
from ...training import derive_seed, make_optimizer, seeded, train_pass
from ...wire import Message
from ...personalization.base import evaluate as evaluate_own
from ..base import ClientResult, ClientRows, Context, Framework
from .alignment import make_alignment
from .codecs import class_space, make_codec
from .losses import kd_loss, row_weights
from .mixed import MixedPass, Step
from .refiners import REFINERS
from .selectors import SELECTORS, select_examples

log = logging.getLogger(__name__)


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
        # rank-r adapter (adapters/lora_state.py). The server's model has rank model.lora_r.
        self.shapes = {k: v.shape for k, v in self.init_state.items()}
        self.global_state = self.padded(lora.resize(self.init_state, self.cfg.model.lora_r))
        self.knowledge: dict[str, torch.Tensor] = {}  # what configure sends: the last b6 outputs
        self.prior_flops = 0  # kd.topk_merge = "class": this round's forward pass for merge_prior
        self.scores: torch.Tensor | None = None  # kd.select's score per public example (none yet: random)
        kd = self.cfg.kd
        self.codec, self.refiner = make_codec(kd), REFINERS[kd.aggregation]
        self.selector, self.alignment = SELECTORS[kd.select](), make_alignment(kd)
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
        return self.codec.decode(tensors, self.rows if rows is None else rows, self.width)

    def selection(self, rnd: int) -> torch.Tensor:
        """The public examples round ``rnd`` uses and sends (kd.public_per_round; 0 = all)."""
        return select_examples(len(self.row_count), self.cfg.kd.public_per_round, self.scores, self.cfg.seed, rnd)

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
        """Each public row's distillation weight (losses.row_weights)."""
        return row_weights(teacher, keep, self.cfg.kd)

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

    def uploads(self, rnd: int, results: dict, rows: int) -> tuple[dict, dict[str, str]]:
        """b4 starts by checking each upload: -> ({"probs", "weights", "hists", "cids"} of the
        usable ones, {client: why} of the rejected ones)."""
        got: dict[str, list] = {"probs": [], "weights": [], "hists": [], "cids": []}
        rejected = {}
        merge = self.cfg.kd.topk_merge == "class" and self.cfg.kd.logit_topk
        prior = self.merge_prior(rnd) if merge else None
        for cid in sorted(results):
            msg, metrics = results[cid]
            try:
                p = self.decode(msg.tensors, rows)
                if merge and p.shape[-1] == self.width + 1:  # kd.topk_merge = "class"
                    p = class_space(p, prior)
                hist = self.alignment.read(msg.tensors, self.ctx.data.num_labels)
            except FedtuneError as exc:
                rejected[str(cid)] = str(exc)
                log.warning("round %d: rejected client %s's upload: %s", rnd, cid, exc)
                continue
            got["probs"].append(p)
            got["hists"].append(hist)
            got["cids"].append(cid)
            got["weights"].append(float(metrics.get("num_samples", 1)))
        return got, rejected

    def merge_prior(self, rnd: int) -> torch.Tensor | None:
        """kd.topk_merge = "class": the server model's distribution (at T) on this round's rows, by
        which each client's rest mass is spread; None (uniform) in round 1, where the untrained
        model's says nothing. Its forward pass counts in the round's server FLOPs."""
        if rnd == 1:
            return None
        models.set_tunable(self.ctx.model, self.global_state)
        outputs, self.prior_flops = self.public_outputs(self.selection(rnd))
        return torch.softmax(outputs / self.cfg.kd.temperature, dim=-1)

    def aggregate(self, rnd, results):
        cfg, ctx = self.cfg, self.ctx
        examples = self.selection(rnd)  # the public examples this round's uploads cover
        rows = self.rows_of(examples)
        self.prior_flops = 0
        got, rejected = self.uploads(rnd, results, len(rows))
        record = {"rejected": rejected} if rejected else {}
        if not got["probs"]:  # nothing usable: the global model stays as it was
            models.set_tunable(ctx.model, self.global_state)
            flops = self.next_knowledge(rnd, record)  # next round's rows may differ from this round's
            return {**record, "kd_rows_kept": 0, "server_flops": flops}
        refined = self.refiner(got["probs"], got["weights"], got["cids"], cfg.kd)
        record.update(refined.record)
        self.scores = self.selector.after_uploads(self.scores, examples, got["probs"], self.row_count)
        teacher = self.full(rows, refined.teacher)
        record.update(self.public_accuracy("kd_teacher_public_accuracy", refined.teacher, examples))
        keep = torch.zeros(self.rows, dtype=torch.bool)
        keep[rows] = refined.keep
        weight = self.weights(teacher, keep)
        weight[rows] *= self.align(examples, self.alignment.pool(got["hists"]), record)
        models.set_tunable(ctx.model, self.global_state)
        head_lr = cfg.kd.server_lr * cfg.train.head_lr / cfg.train.lr  # the head keeps its faster rate
        with seeded(cfg.seed, "server-kd", rnd):  # b5
            loss, distil_flops = self.distil(teacher, weight, cfg.kd.server_epochs, cfg.kd.server_lr, head_lr,
                                             "server-kd", rnd)
        self.global_state = models.get_tunable(ctx.model)
        out_flops = self.next_knowledge(rnd, record)
        return {**record, "server_kd_loss": loss, "kd_rows": self.rows, "kd_rows_kept": int(keep.sum()),
                "server_kd_confidence": float(weight[keep].mean()) if keep.any() else 0.0,
                "server_flops": distil_flops + out_flops + self.prior_flops}

    def next_knowledge(self, rnd: int, record: dict) -> int:
        """b6: the global model's outputs on all public rows, when the clients distil them or the
        selector ranks by them; what is sent is next round's selected rows, encoded.
        -> the FLOPs spent."""
        cfg = self.cfg.kd
        if not (cfg.client_kd_weight or self.selector.needs_global_outputs):
            return 0
        outputs, flops = self.public_outputs()
        record.update(self.public_accuracy("kd_server_public_accuracy", outputs, torch.arange(len(self.row_count))))
        self.scores = self.selector.after_global(self.scores, outputs, self.row_count)
        if cfg.client_kd_weight:
            sent = outputs[self.rows_of(self.selection(rnd + 1))]
            self.knowledge = self.codec.encode(sent)
            error = self.codec.error(sent, self.knowledge)
            if error is not None:
                record["server_logit_rank_error"] = error
        return flops

    def public_accuracy(self, key: str, probs: torch.Tensor, examples: torch.Tensor) -> dict[str, float]:
        """A diagnostic for the server record, which the protocol never uses (kd's public rows are
        unlabeled to it): how often ``probs``' top class is the public example's label
        (classification with full distributions only; empty otherwise)."""
        if self.ctx.task.name != "classify" or probs.shape[-1] != self.ctx.data.num_labels:
            return {}
        labels = torch.tensor([self.ctx.data.public.labels[i] for i in examples.tolist()])
        return {key: float((probs.argmax(-1) == labels).float().mean())}

    def align(self, examples: torch.Tensor, pooled: torch.Tensor | None, record: dict) -> torch.Tensor:
        """kd.align: each selected public row's weight in b5, from the clients' pooled label
        histogram (per example, repeated over its rows; all 1 without kd.align)."""
        labels = [self.ctx.data.public.labels[i] for i in examples.tolist()]
        w = self.alignment.example_weights(pooled, labels, self.ctx.data.num_labels, record)
        return torch.repeat_interleave(w, self.row_count[examples])

    # ---- client side
    def client_steps(self, rnd: int, cid: int, epoch: int, distilling: bool,
                     examples: torch.Tensor | None = None, rows: ClientRows | None = None) -> list[Step]:
        """One epoch: the private batches, each paired (when distilling) with an equal slice of
        the shuffled public examples (this round's selection; all by default), so the pass covers
        both sets once."""
        ctx = self.ctx
        private = ctx.client_batches(rnd, cid, epoch, rows=rows)
        if not distilling:
            return [Step(b) for b in private]
        examples = torch.arange(len(self.row_count)) if examples is None else examples
        size = -(-len(examples) // max(len(private), 1))  # ceil: at most one slice per private batch
        public = self.public_batches(examples, size, derive_seed(self.cfg.seed, "client-kd", rnd, cid, epoch))
        return [Step(b, pb) for b, pb in zip_longest(private, public)]

    def client_train(self, rnd: int, cid: int, teacher: torch.Tensor | None,
                     examples: torch.Tensor | None = None, dp=None, rows: ClientRows | None = None) -> dict:
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
        mixed = MixedPass(self, teacher, every, weight, lam)
        rule = self.continual_rule()  # continual.method=ewc
        for epoch in range(cfg.train.local_epochs):
            mixed.new_epoch()
            steps = self.client_steps(rnd, cid, epoch, teacher is not None, every, rows)
            if dp is None:
                train_pass(ctx.model, steps, cfg.train, ctx.device, ctx.flops, mixed.loss, on_step=ctx.on_step,
                           flop_fn=mixed.flop, on_grad=rule.on_grad if rule else None)
            else:  # config.validate keeps continual.method=ewc (rule) away from DP-SGD
                dp_sgd.train_pass(ctx.model, steps, cfg.train, ctx.device, ctx.flops, ctx.task.loss, dp,
                                  on_step=ctx.on_step, flop_fn=mixed.flop, private_of=lambda step: step.private,
                                  public_loss=mixed.public_kd, weight=1.0 if teacher is None else 1 - lam,
                                  on_losses=mixed.parts["ce"].extend)
        out = mixed.metrics()
        if teacher is not None:
            out["client_kd_confidence"] = float(weight[sent].mean())
        return out

    def client_accuracy(self) -> float:
        """The client's own model on the first ``kd.client_eval_size`` test rows (not protocol compute)."""
        ctx = self.ctx
        return ctx.task.evaluate(ctx.model, ctx.test_batches(limit=self.cfg.kd.client_eval_size), ctx.device)["accuracy"]

    def fit(self, rnd, cid, msg, state, link, rows=None):
        ctx, cfg = self.ctx, self.cfg
        own = ctx.client_rows(cid) if rows is None else rows
        r = self.client_rank(cid)
        models.set_tunable(ctx.model, self.padded(state["tunable"] if state else lora.resize(self.init_state, r)))
        knowledge = {k: v for k, v in msg.tensors.items() if k != "public_ids"}
        examples = msg.tensors["public_ids"].long() if "public_ids" in msg.tensors else torch.arange(len(self.row_count))
        public_rows = self.rows_of(examples)
        teacher = (self.full(public_rows, self.decode(knowledge, len(public_rows)))
                   if knowledge and cfg.kd.client_kd_weight else None)
        guard = ClientGuard(cfg, cid, len(own), state)
        metrics: dict = {}
        # on the global test rows; with clients' own test rows (data.client_test_size) those take the name
        key = "client_global_test_accuracy" if cfg.data.client_test_size else "client_test_accuracy"
        if teacher is not None and cfg.kd.client_eval_size:  # so a teacher that hurts shows
            metrics[f"{key}_before"] = self.client_accuracy()
        metrics.update(self.client_train(rnd, cid, teacher, examples, guard.dp, own))  # b8 + b1
        outputs, public_flops = self.public_outputs(examples)  # b2: this round's public examples only
        outputs = guard.noise_outputs(outputs)  # clipped and noised before they leave the client
        if cfg.kd.client_eval_size:
            metrics[key] = self.client_accuracy()
        metrics.update(evaluate_own(self, cid))  # the client's own model is its personal one
        metrics.update(
            num_samples=len(own), client_flops_public=public_flops,
            client_flops=metrics["client_flops_train"] + metrics["client_flops_kd"] + public_flops, **guard.record(),
        )
        # b3: upload the compressed outputs; keep the local model (and the accountant) for the next round
        kept = guard.keep({"tunable": lora.resize(models.get_tunable(ctx.model), r)})
        up = self.codec.encode(outputs)
        error = self.codec.error(outputs, up)
        if error is not None:
            metrics["logit_rank_error"] = error
        # kd.align's label histogram travels in the metered upload
        up.update(self.alignment.upload(own.labels, ctx.data.num_labels))
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
