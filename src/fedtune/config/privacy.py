"""The privacy section: differential privacy and secure aggregation (docs/privacy.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FedtuneError
from .checks import one_of
from .fed import sampled_clients

SECAGG_MODULUS = 2**32  # SecAgg+'s mask range (Flower's default and maximum): sums wrap modulo this


@dataclass
class PrivacyConfig:
    """Differential privacy (docs/privacy.md). delta 0 = 1/(10 n): n = a client's records for
    DP-SGD, the number of clients for central DP (output noise: 1/n, n = the client's records)."""

    dp_sgd: bool = False  # record-level DP-SGD in every client's local training
    # DP-SGD's batches: "poisson" (each record joins each step with probability batch/n, what the
    # accountant assumes) or "shuffle" (fixed-size slices of a shuffle; records say epsilon_assumes)
    sampler: str = "poisson"
    per_example: str = "vmap"  # DP-SGD's per-example gradients: "vmap" (torch.func, one pass) or "loop"
    accountant: str = "rdp"  # "rdp" or "prv" (Opacus's; prv is tighter)
    audit: bool = False  # plant canaries in the clients' rows; `fedtune audit RUN_DIR` measures them
    audit_canaries: int = 100  # canaries over all clients, each planted or held out by a fair coin (privacy.audit)
    clip: float = 1.0  # per-example gradient L2 bound
    noise_multiplier: float = 1.0  # noise std / clip; ignored when target_epsilon > 0
    target_epsilon: float = 0.0  # > 0: calibrate the noise so the run ends at this epsilon
    delta: float = 0.0
    central_dp: bool = False  # client-level DP-FedAvg at the server
    update_clip: float = 1.0  # each client's update (state - global) L2 bound
    update_noise_multiplier: float = 1.0  # noise std on the sum / update_clip; target_epsilon calibrates it too
    # What kd and split send (public-set logits, activations at the cut): clipped and noised; 0 = off.
    output_noise_multiplier: float = 0.0
    output_clip: float = 1.0  # L2 bound of one example's activations (split) or one public row's logits (kd)
    # Secure aggregation (Flower's SecAgg+, Flower runtimes, fedavg): the server learns only the weighted mean.
    secagg: bool = False
    secagg_clip_range: float = 8.0  # each weighted upload value is clipped to +-this before quantization
    secagg_quantization_range: int = 4194304  # 2**22 integer levels over [-clip, clip]
    secagg_reconstruction_threshold: float = 0.5  # fraction of a client's shares that rebuild its secrets


def validate(cfg: Any) -> None:
    p = cfg.privacy
    for key, value in (("privacy.clip", p.clip), ("privacy.update_clip", p.update_clip),
                       ("privacy.output_clip", p.output_clip)):
        if not value > 0:
            raise FedtuneError(f"{key} must be > 0 (an L2 bound); got {value}")
    for key, value in (("privacy.noise_multiplier", p.noise_multiplier),
                       ("privacy.update_noise_multiplier", p.update_noise_multiplier),
                       ("privacy.target_epsilon", p.target_epsilon),
                       ("privacy.output_noise_multiplier", p.output_noise_multiplier)):
        if value < 0:
            raise FedtuneError(f"{key} must be >= 0; got {value}")
    if not 0.0 <= p.delta < 1.0:
        raise FedtuneError(f"privacy.delta must be in [0, 1) (0 = 1/(10 n)); got {p.delta}")
    one_of("privacy.sampler", p.sampler, ("poisson", "shuffle"))
    one_of("privacy.per_example", p.per_example, ("vmap", "loop"))
    one_of("privacy.accountant", p.accountant, ("rdp", "prv"))
    if p.audit_canaries < 2 or p.audit_canaries % 2:
        raise FedtuneError(f"privacy.audit_canaries must be an even number >= 2 (half in, half out); "
                           f"got {p.audit_canaries}")
    if p.dp_sgd and p.sampler == "poisson" and cfg.split.sample == "loss":
        raise FedtuneError("privacy.sampler=poisson draws each step's rows at random; split.sample=loss picks "
                           "them by loss (use split.sample=random)")
    if p.secagg:
        _validate_secagg(p, sampled_clients(cfg.fed))


def _validate_secagg(p: PrivacyConfig, sampled: int) -> None:
    """privacy.secagg: Flower's SecAgg+ hands the server one weighted mean. Which runtimes,
    frameworks and strategies it runs under is a rule across families (rules.py)."""
    if p.central_dp:
        raise FedtuneError("privacy.central_dp clips each client's update, which privacy.secagg hides from the server")
    if sampled < 2:
        raise FedtuneError(f"privacy.secagg needs >= 2 sampled clients (a sum of one is the update); got {sampled}")
    if not p.secagg_clip_range > 0:
        raise FedtuneError(f"privacy.secagg_clip_range must be > 0; got {p.secagg_clip_range}")
    if not 0 < p.secagg_quantization_range < SECAGG_MODULUS // sampled:
        raise FedtuneError(f"privacy.secagg_quantization_range must be in [1, 2**32 / sampled clients = "
                           f"{SECAGG_MODULUS // sampled}) so the sum cannot wrap; got {p.secagg_quantization_range}")
    if not 0 < p.secagg_reconstruction_threshold <= 1:
        raise FedtuneError(f"privacy.secagg_reconstruction_threshold must be in (0, 1] (a fraction of the shares); "
                           f"got {p.secagg_reconstruction_threshold}")
