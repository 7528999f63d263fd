"""FedLLM: clients fine-tune LoRA (and the head) locally; the server aggregates the
tunable parameters with a strategy (FedAvg by default) and sends them back (paper steps a1-a4).

LoRA ranks may differ per client (``model.client_ranks``) or grow over rounds
(``model.rank_schedule``): each client receives and uploads a state of its own rank, held
zero-padded in the one shared model (adapters/lora_state.py says why that is exact). What a
client receives, and what the server does after aggregating, are the strategy's hooks
(strategies/base.py). Every server record of a LoRA run carries ``aggregation_error``: how far
the product of the averaged factors is from the average of the clients' products (docs/peft.md)."""

from __future__ import annotations

from .. import models
from ..adapters import lora_state as lora
from ..adapters.lora import max_rank
from ..strategies.base import split_extras, with_extras
from ..privacy.guard import ClientGuard
from ..wire import Message
from .base import SUMMED, ClientResult, Context, Framework


class FedAvgFramework(Framework):
    name = "fedavg"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        state = models.get_tunable(ctx.model)
        self.shapes = {k: v.shape for k, v in state.items()}  # the model's rank-r_max adapter
        state = self.personal.start(state)  # without what each client keeps for itself
        self.global_state = lora.resize(state, self.rank(1, 0)) if self.cfg.model.rank_schedule else state
        # FFA-LoRA's frozen A: not sent, but part of every product B A.
        self.frozen = {n: p.detach().clone() for n, p in ctx.model.named_parameters()
                       if lora.A_KEY in n and not p.requires_grad}

    def rank(self, rnd: int, cid: int) -> int:
        """Client ``cid``'s LoRA rank in round ``rnd``."""
        m = self.cfg.model
        if m.rank_schedule:
            return m.rank_schedule[str(max(int(k) for k in m.rank_schedule if int(k) <= rnd))]
        return m.client_ranks[cid] if m.client_ranks else m.lora_r

    def configure(self, rnd, cid):  # a1: send the global tunable parameters, as the strategy shapes them
        r = self.rank(rnd, cid)
        if self.cfg.model.rank_schedule and lora.rank(self.global_state) < r:
            # The rank grows: new A rows seeded (std 1/r, as PEFT's gaussian init), new B columns
            # zero, so the global model's output is unchanged.
            self.global_state = lora.resize(self.global_state, r, seed=self.cfg.seed, std=1.0 / r)
        # for a rank-r client (FLoRA: a fresh adapter and the stack to merge), with whatever the
        # strategy sends along (SCAFFOLD's c)
        tunable = self.personal.down(self.strategy.for_client(self.global_state, r))
        return Message(with_extras(tunable, self.strategy.downlink(self.global_state, cid)))

    def fit(self, rnd, cid, msg, state, link, rows=None):  # a2: local fine-tuning
        rows = self.ctx.client_rows(cid) if rows is None else rows
        tunable, rule = self.local_rule(msg, state)
        tensors = lora.apply_merges(self.ctx.model, tunable)
        r = lora.rank(tensors)
        models.set_tunable(self.ctx.model, lora.fit_to(tensors, self.shapes))
        seen = self.personal.received(self, cid)  # the global model on the client's own test rows
        guard = ClientGuard(self.cfg, cid, len(rows), state)
        loss, flops = self.local_train(rnd, cid, rule=rule, dp=guard.dp, rows=rows)
        metrics = {"train_loss": loss, "client_flops": flops, "num_samples": len(rows), **seen, **guard.record()}
        # a3: upload the fine-tuned tunable parameters, the client's own rank only (rewritten if
        # this client is a simulated attacker)
        up = models.get_tunable(self.ctx.model)
        up = guard.upload(tensors, lora.resize(up, r) if r else up)
        return ClientResult(Message(with_extras(up, rule.upload())), guard.keep(rule.state()), metrics)

    def aggregate(self, rnd, results):  # a4: aggregate into the global parameters
        # the clients' tunable states, without what a strategy sent along (SCAFFOLD's variates)
        updates = [(split_extras(msg.tensors)[0], metrics["num_samples"]) for msg, metrics in results.values()]
        has_lora = bool(lora.pairs({**self.frozen, **updates[0][0]}))
        # The error needs each client's own factors, which a secure sum (SUMMED) hides.
        exact = has_lora and SUMMED not in results
        record = {"aggregation_error": lora.aggregation_error(updates, frozen=self.frozen)} if exact else {}
        record.update(self.aggregate_tunable(results))
        # the strategy's own record entries and work on the model (FLoRA merges its stack)
        record.update(self.strategy.after_aggregate(self.ctx.model, self.global_state, updates, self.frozen))
        return record

    def global_model(self):
        # what a client of the model's full rank would hold (FLoRA's: the merged weights, a fresh adapter)
        state = lora.apply_merges(self.ctx.model, self.strategy.for_client(self.personal.global_view(self.global_state),
                                                                          max_rank(self.cfg.model)))
        models.set_tunable(self.ctx.model, lora.fit_to(state, self.shapes))
        return self.ctx.model

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.strategy.restore(self.ctx.model)  # a resumed run's model is fresh: FLoRA's merges are redone
