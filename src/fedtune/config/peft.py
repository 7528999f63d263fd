"""The model section: the base model and its tunable parameters (model.peft; docs/peft.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import ADAPTERS
from ..errors import FedtuneError
from .checks import at_least_one, one_of


@dataclass
class ModelConfig:
    # "smollm2" (embedded, default), "minilm" (embedded), "tiny-gpt2"/"tiny-llama"/"tiny-bert"
    # (random init, for tests), a Hugging Face id, a local directory or a .gguf file.
    name: str = "smollm2"
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (alpha/r, or alpha/sqrt(r) with rslora)
    lora_dropout: float = 0.1  # dropout on LoRA's input
    lora_init: str = "gaussian"  # PEFT's init_lora_weights ("default" = PEFT's own)
    target_modules: list[str] = field(default_factory=list)  # empty = per-architecture default
    # transformers' attention kernel: "sdpa", "eager" or "auto" (sdpa; eager under train.precision=bf16
    # on a CPU, where it is the faster one); config.toml records the choice.
    attn_implementation: str = "auto"
    quantize: str = ""  # "", "4bit" or "8bit": a frozen bitsandbytes base under LoRA (QLoRA); CUDA only
    # Tunable-parameter design (docs/peft.md).
    peft: str = "lora"  # adapters.ADAPTERS: "lora", "dora", "ia3", "prompt" (prompt tuning) or "prefix" (prefix tuning)
    virtual_tokens: int = 10  # prompt/prefix: learned tokens prepended to the input / to every layer's keys
    lora_scaling: str = "standard"  # "standard" (alpha/r) or "rslora" (alpha/sqrt(r))
    lora_freeze_a: bool = False  # FFA-LoRA: A stays at its seeded init; only B is trained and sent
    client_ranks: list[int] = field(default_factory=list)  # one LoRA rank per client; empty = lora_r for all
    # round -> LoRA rank from that round on, e.g. {1 = 2, 6 = 4}; keys are strings as in TOML
    rank_schedule: dict[str, int] = field(default_factory=dict)
    # A finished run directory whose final tunable state (LoRA + head, its adapter/) is the
    # global state before round 1 (a warm start; docs/zo.md); "" = the seeded initialisation.
    init_from: str = ""


def validate(cfg: Any) -> None:
    """model.*: the PEFT method, its ranks and the warm start. Which frameworks, strategies and
    tasks a method fits is a rule across families (rules.py)."""
    m = cfg.model
    ADAPTERS.check("model.peft", m.peft)
    one_of("model.lora_scaling", m.lora_scaling, ("standard", "rslora"))
    one_of("model.quantize", m.quantize, ("", "4bit", "8bit"))
    at_least_one({"model.lora_r": m.lora_r})
    if ADAPTERS.has(m.peft, "virtual_tokens") and m.virtual_tokens < 1:
        raise FedtuneError(f"model.virtual_tokens must be >= 1 with model.peft={m.peft}; got {m.virtual_tokens}")
    if m.lora_freeze_a and not ADAPTERS.has(m.peft, "rank"):
        raise FedtuneError(f"model.lora_freeze_a applies to {' and '.join(ADAPTERS.having('rank'))}; "
                           f"got model.peft={m.peft}")
    _validate_ranks(cfg)
    # The rest (a finished run, the same model, task, labels and tensor shapes) is checked where
    # the state loads (inference.warm_start): a sweep may name a run that an earlier cell writes.
    if m.init_from and cfg.out and Path(m.init_from).resolve() == Path(cfg.out).resolve():
        raise FedtuneError(f"model.init_from={m.init_from} is this run's own directory (out); name another, "
                           "finished run")


def _validate_ranks(cfg: Any) -> None:
    """model.client_ranks and model.rank_schedule, on their own."""
    m = cfg.model
    if m.client_ranks and len(m.client_ranks) != cfg.fed.clients:
        raise FedtuneError(
            f"model.client_ranks needs one rank per client (fed.clients={cfg.fed.clients}); got {len(m.client_ranks)}")
    ranks = list(m.client_ranks) + list(m.rank_schedule.values())
    if any(r < 1 for r in ranks):
        raise FedtuneError(f"LoRA ranks must be >= 1; got model.client_ranks={m.client_ranks}, "
                           f"model.rank_schedule={m.rank_schedule}")
    if m.client_ranks and m.rank_schedule:
        raise FedtuneError("set model.client_ranks or model.rank_schedule, not both")
    if m.rank_schedule:
        rounds = sorted(int(k) for k in m.rank_schedule)
        if rounds[0] != 1 or any(
                m.rank_schedule[str(b)] < m.rank_schedule[str(a)] for a, b in zip(rounds, rounds[1:])):
            raise FedtuneError(f"model.rank_schedule must start at round 1 and never lower the rank; "
                               f"got {m.rank_schedule}")
