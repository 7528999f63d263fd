"""Simulated attackers (``fed.attack`` on ``fed.malicious_clients``), to measure what robust
strategies defend against. Model poisoning rewrites the uploaded tunable state from the honest
update delta = local - global: ``sign_flip`` sends global - delta, ``scale`` global +
fed.attack_scale * delta, ``gaussian`` global + noise of std fed.attack_scale x RMS(delta).
``label_flip`` poisons the data instead: the client trains on label L - 1 - y."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def is_malicious(cfg, cid: int) -> bool:
    return bool(cfg.fed.attack) and cid in cfg.fed.malicious_clients


def mark(cfg, cid: int) -> dict:
    """What an attacker's metrics record carries (nothing for an honest client)."""
    return {"malicious": True, "attack": cfg.fed.attack} if is_malicious(cfg, cid) else {}


def flip_labels(cfg, cid: int, labels: list[int], num_labels: int) -> list[int]:
    if is_malicious(cfg, cid) and cfg.fed.attack == "label_flip":
        return [num_labels - 1 - y for y in labels]
    return labels


def poison(cfg, cid: int, sent: State, local: State) -> State:
    """The tunable state client ``cid`` uploads, given what the server sent and what it trained."""
    attack = cfg.fed.attack
    if not is_malicious(cfg, cid) or attack == "label_flip":
        return local
    delta = {k: local[k].double() - sent[k].double() for k in local}
    if attack == "sign_flip":
        delta = {k: -d for k, d in delta.items()}
    elif attack == "scale":
        delta = {k: cfg.fed.attack_scale * d for k, d in delta.items()}
    else:  # gaussian: the run's seeded RNG (rounds.run_client), so a resumed run draws the same noise
        count = sum(d.numel() for d in delta.values())
        rms = float(torch.sqrt(sum(d.pow(2).sum() for d in delta.values()) / max(count, 1)))
        delta = {k: torch.randn(d.shape, dtype=torch.float64) * cfg.fed.attack_scale * rms for k, d in delta.items()}
    return {k: (sent[k].double() + delta[k]).to(local[k].dtype) for k in local}
