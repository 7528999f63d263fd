"""FedLLM: clients fine-tune LoRA (and the head) locally; the server aggregates the
tunable parameters with a strategy (FedAvg by default) and sends them back (paper steps a1-a4)."""

from __future__ import annotations

from .. import models
from ..privacy import attacks, dp_sgd
from ..wire import Message
from .base import ClientResult, Context, Framework


class FedAvgFramework(Framework):
    name = "fedavg"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.global_state = models.get_tunable(ctx.model)

    def configure(self, rnd, cid):  # a1: send the global tunable parameters
        return Message(self.global_state)

    def fit(self, rnd, cid, msg, state, link):  # a2: local fine-tuning
        models.set_tunable(self.ctx.model, msg.tensors)
        n = len(self.ctx.data.clients[cid])
        dp = dp_sgd.for_client(self.cfg, n, state)
        loss, flops = self.local_train(rnd, cid, dp=dp)
        metrics = {"train_loss": loss, "client_flops": flops, "num_samples": n,
                   **attacks.mark(self.cfg, cid), **(dp.record() if dp else {})}
        # a3: upload the fine-tuned tunable parameters (rewritten if this client is a simulated attacker)
        up = attacks.poison(self.cfg, cid, msg.tensors, models.get_tunable(self.ctx.model))
        return ClientResult(Message(up), dp_sgd.keep(dp, None), metrics)

    def aggregate(self, rnd, results):  # a4: aggregate into the global parameters
        return self.aggregate_tunable(results)
