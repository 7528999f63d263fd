"""``rep`` (FedRep; Collins et al., 2021, "Exploiting Shared Representations for Personalized
Federated Learning", Algorithm 1): the head stays with the client. Each round the client first
trains its head for ``fed.personal_epochs`` with the shared adapter frozen, then the adapter for
``train.local_epochs`` with the head frozen; only the adapter is uploaded."""

from __future__ import annotations

from .. import models
from ..strategies.base import split_extras, with_extras
from ..wire import Message
from .base import KeyedPersonalization, frozen, personal_train


class FedRep(KeyedPersonalization):
    name = "rep"

    def keeps(self, name):
        return models.is_head(name)

    def train(self, fw, rnd, cid, msg, state, link, rows):
        module = fw.tunable_module()
        tunable, extras = split_extras(msg.tensors)
        models.set_tunable(module, tunable)
        with frozen(module, lambda n: not self.keeps(n)):
            loss, flops = personal_train(fw, rnd, cid, rows)
        head = {n: p.detach().clone() for n, p in module.named_parameters() if self.keeps(n)}
        with frozen(module, self.keeps):
            result = fw.fit(rnd, cid, Message(with_extras({**tunable, **head}, extras)), state, link, rows=rows)
        m = result.metrics
        m.update(personal_loss=loss, client_flops_personal=flops, client_flops=m.get("client_flops", 0) + flops)
        return result
