"""The fed section: clients, rounds, the server strategy and the robustness keys (simulated
attackers and the robust strategies' settings; docs/strategies.md, docs/privacy.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FedtuneError
from ..personalization import PERSONALIZATION
from ..strategies import STRATEGIES
from .checks import at_least_one

# Simulated attacks: the first three poison the uploaded weights (model poisoning), label_flip the data.
WEIGHT_ATTACKS = ("sign_flip", "scale", "gaussian")
DATA_ATTACKS = ("label_flip",)
ATTACKS = WEIGHT_ATTACKS + DATA_ATTACKS


@dataclass
class FedConfig:
    clients: int = 3  # simulated clients the private rows are split over
    rounds: int = 3  # federated rounds
    fraction: float = 1.0  # fraction of clients sampled each round
    strategy: str = "fedavg"  # strategies.STRATEGIES: how the server aggregates tunable parameters
    client_timeout_s: float = 0.0  # used by distributed runtimes; 0 = wait forever
    # FedProx: clients minimise loss + prox_mu/2 ||w - w_global||^2 over the tunable parameters.
    prox_mu: float = 0.0
    # Server optimizers on the pseudo-gradient (docs/strategies.md): fedavgm, fedadam, fedyogi,
    # fedadagrad, and SCAFFOLD's global step size. fedavg ignores them.
    server_lr: float = 1.0  # adaptive strategies want ~1e-2..1e-1 (Reddi et al., 2021)
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam, fedyogi, fedadagrad (first moment)
    beta2: float = 0.99  # fedadam, fedyogi (second moment)
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity (added to sqrt(v))
    # Robust strategies (docs/privacy.md): trimmed_mean drops this fraction at each end per coordinate,
    # krum/multikrum assume up to krum_f Byzantine clients, norm_bound clips each update's L2 norm.
    trim_fraction: float = 0.2
    krum_f: int = 1  # krum/multikrum: Byzantine clients assumed
    norm_bound: float = 1.0  # norm_bound: each update's L2 norm is clipped to this
    # Simulated attackers: "" (none), sign_flip, scale, gaussian (model poisoning) or label_flip (data).
    attack: str = ""
    attack_scale: float = 10.0  # scale: the update's factor; gaussian: the noise's std in update RMS units
    malicious_clients: list[int] = field(default_factory=list)  # the attackers' client ids
    # personalization.PERSONALIZATION (docs/personalization.md): "none", or what each client keeps
    # for itself (finetune, head, rep, ditto, lora_b, dual_lora, prompt, client_part).
    personalization: str = "none"
    personal_epochs: int = 1  # finetune, rep (the head's epochs), ditto: passes over the client's rows
    ditto_lambda: float = 0.1  # ditto: the personal model's pull lambda/2 ||w_personal - w_global||^2


def sampled_clients(f: FedConfig) -> int:
    """The clients that take part in one round."""
    return max(1, round(f.fraction * f.clients))


def validate(cfg: Any) -> None:
    f = cfg.fed
    STRATEGIES.check("fed.strategy", f.strategy)
    at_least_one({"fed.clients": f.clients, "fed.rounds": f.rounds})
    if not 0.0 < f.fraction <= 1.0:
        raise FedtuneError(f"fed.fraction must be in (0, 1]; got {f.fraction}")
    if f.prox_mu < 0:
        raise FedtuneError(f"fed.prox_mu must be >= 0 (0 = no proximal term); got {f.prox_mu}")
    if f.server_lr <= 0:
        raise FedtuneError(f"fed.server_lr must be > 0; got {f.server_lr}")
    for key in ("server_momentum", "beta1", "beta2"):
        if not 0.0 <= getattr(f, key) < 1.0:
            raise FedtuneError(f"fed.{key} must be in [0, 1); got {getattr(f, key)}")
    if f.tau <= 0:
        raise FedtuneError(f"fed.tau must be > 0; got {f.tau}")
    if STRATEGIES.has(f.strategy, "every_client") and f.fraction < 1.0:
        raise FedtuneError(f"fed.strategy={f.strategy} needs fed.fraction=1: every client merges every round's "
                           "stacked adapter")
    PERSONALIZATION.check("fed.personalization", f.personalization)
    if f.personal_epochs < 1:
        raise FedtuneError(f"fed.personal_epochs must be >= 1; got {f.personal_epochs}")
    if f.ditto_lambda < 0:
        raise FedtuneError(f"fed.ditto_lambda must be >= 0; got {f.ditto_lambda}")
    _validate_robust(f)


def _validate_robust(f: FedConfig) -> None:
    """The simulated attackers and the robust strategies' settings."""
    if f.attack and f.attack not in ATTACKS:
        raise FedtuneError(f"fed.attack must be empty or one of {', '.join(ATTACKS)}; got {f.attack!r}")
    bad = [c for c in f.malicious_clients if not 0 <= c < f.clients]
    if bad:
        raise FedtuneError(f"fed.malicious_clients must be client ids in [0, {f.clients}); got {bad}")
    if len(set(f.malicious_clients)) >= f.clients:
        raise FedtuneError(f"fed.malicious_clients must name fewer clients than fed.clients={f.clients}; "
                           f"got {len(set(f.malicious_clients))}")
    if bool(f.attack) != bool(f.malicious_clients):
        raise FedtuneError("fed.attack and fed.malicious_clients go together: set both or neither")
    if f.attack_scale <= 0:
        raise FedtuneError(f"fed.attack_scale must be > 0; got {f.attack_scale}")
    if not 0.0 <= f.trim_fraction < 0.5:
        raise FedtuneError(f"fed.trim_fraction must be in [0, 0.5); got {f.trim_fraction}")
    if f.norm_bound <= 0:
        raise FedtuneError(f"fed.norm_bound must be > 0; got {f.norm_bound}")
    sampled = sampled_clients(f)
    if f.krum_f < 0 or (STRATEGIES.has(f.strategy, "byzantine_f") and sampled < 2 * f.krum_f + 3):
        raise FedtuneError(f"fed.strategy={f.strategy} with fed.krum_f={f.krum_f} needs >= {2 * f.krum_f + 3} "
                           f"sampled clients (2f+3); got {sampled}")
