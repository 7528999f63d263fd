"""``client_part`` (split learning): each client's side of the cut (its embeddings' and first
blocks' adapter) stays with the client, while the server part, which every client's batches
train, is the shared model. The round-end upload of the client part falls away; the activations
and gradients at the cut are exchanged as always. A client's personal model is its own part
with the server's; the global model (adapter/) is the initial client part with the server's."""

from __future__ import annotations

from .base import KeyedPersonalization


class ClientPart(KeyedPersonalization):
    name = "client_part"

    def keeps(self, name):
        return True
