"""FedLLM: clients fine-tune LoRA (and the head) locally; the server aggregates the
tunable parameters with a strategy (FedAvg by default) and sends them back (paper steps a1-a4)."""

from __future__ import annotations

from .. import models
from ..aggregation import make_strategy
from ..metering import Message
from .base import ClientResult, Context, Framework


class FedAvgFramework(Framework):
    name = "fedavg"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.global_state = models.get_tunable(ctx.model)
        self.strategy = make_strategy(self.cfg.fed.strategy)

    def configure(self, rnd, cid):  # a1: send the global tunable parameters
        return Message(self.global_state)

    def fit(self, rnd, cid, msg, state, link):  # a2: local fine-tuning
        models.set_tunable(self.ctx.model, msg.tensors)
        loss, flops = self.local_train(rnd, cid)
        metrics = {"train_loss": loss, "client_flops": flops, "num_samples": len(self.ctx.data.clients[cid])}
        # a3: upload the fine-tuned tunable parameters
        return ClientResult(Message(models.get_tunable(self.ctx.model)), None, metrics)

    def aggregate(self, rnd, results):  # a4: aggregate into the global parameters
        updates = [(msg.tensors, metrics["num_samples"]) for msg, metrics in results.values()]
        self.global_state = self.strategy.aggregate(self.global_state, updates)
        return {}

    def evaluate(self, rnd):
        ev = self.ctx.task.evaluate(self.global_model(), self.ctx.test_batches(), self.ctx.device)
        return {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"]}

    def global_model(self):
        models.set_tunable(self.ctx.model, self.global_state)
        return self.ctx.model

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
