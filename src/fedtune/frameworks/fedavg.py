"""FedLLM: clients fine-tune LoRA (and the head) locally; the server aggregates the
tunable parameters with a strategy (FedAvg by default) and sends them back (paper steps a1-a4)."""

from __future__ import annotations

from .. import models
from ..strategies.base import with_extras
from ..wire import Message
from .base import ClientResult, Context, Framework


class FedAvgFramework(Framework):
    name = "fedavg"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.global_state = models.get_tunable(ctx.model)

    def configure(self, rnd, cid):  # a1: send the global tunable parameters
        return self.down_message(cid)

    def fit(self, rnd, cid, msg, state, link):  # a2: local fine-tuning
        tunable, rule = self.local_rule(msg, state)
        models.set_tunable(self.ctx.model, tunable)
        loss, flops = self.local_train(rnd, cid, rule=rule)
        metrics = {"train_loss": loss, "client_flops": flops, "num_samples": len(self.ctx.data.clients[cid])}
        # a3: upload the fine-tuned tunable parameters
        up = with_extras(models.get_tunable(self.ctx.model), rule.upload())
        return ClientResult(Message(up), rule.state(), metrics)

    def aggregate(self, rnd, results):  # a4: aggregate into the global parameters
        self.aggregate_tunable(results)
        return {}
