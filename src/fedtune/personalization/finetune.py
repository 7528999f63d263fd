"""``finetune``: the standard baseline. Each round, after its global update, the client
fine-tunes the global state it received for ``fed.personal_epochs`` on its own rows; that copy
is its personal model (scored on its own test rows, saved as adapters/client-K/). Everything
it uploads is the plain global update."""

from __future__ import annotations

from .base import WholeModel


class FineTune(WholeModel):
    name = "finetune"

    def personal_start(self, received, state):
        return received
