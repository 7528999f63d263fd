"""The audit's canaries (``privacy.audit``, docs/privacy.md): ``privacy.audit_canaries`` rows of
random words with a random label, each given to a random client and, by a seeded coin, either
planted among that client's private rows ("in") or held out ("out"). Everything follows from
the run's seed, so ``fedtune audit RUN_DIR`` rebuilds the same canaries."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import FedData, Rows
from ..training import derive_seed

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class Canary:
    text: str
    label: int
    client: int
    member: bool  # planted in the client's rows (the coin came up heads)


def make(cfg, num_labels: int) -> list[Canary]:
    rng = random.Random(derive_seed(cfg.seed, "canaries"))
    out = []
    for _ in range(cfg.privacy.audit_canaries):
        words = [''.join(rng.choice(LETTERS) for _ in range(rng.randint(4, 9))) for _ in range(rng.randint(6, 10))]
        out.append(Canary(" ".join(words), rng.randrange(num_labels), rng.randrange(cfg.fed.clients),
                          rng.random() < 0.5))
    return out


def plant(cfg, fed: FedData) -> FedData:
    """``fed`` with every member canary inserted at a random place among its client's rows."""
    rng = random.Random(derive_seed(cfg.seed, "plant"))
    clients = [Rows(list(r.texts), list(r.labels)) for r in fed.clients]
    for c in make(cfg, fed.num_labels):
        if c.member:
            rows = clients[c.client]
            at = rng.randint(0, len(rows.texts))
            rows.texts.insert(at, c.text)
            rows.labels.insert(at, c.label)
    return FedData(fed.label_names, fed.public, clients, fed.test)
