"""``head`` (FedPer; Arivazhagan et al., 2019, "Federated Learning with Personalization
Layers"): the task head stays with the client, only the adapter is averaged, so the head's bytes
leave the upload and the download. Client and head train together each round."""

from __future__ import annotations

from .. import models
from .base import KeyedPersonalization


class FedPer(KeyedPersonalization):
    name = "head"

    def keeps(self, name):
        return models.is_head(name)
