"""The rules across families: which frameworks, strategies, PEFT methods, privacy mechanisms and
tasks combine. Each rule reads the traits that registry entries declare (``FRAMEWORKS``,
``STRATEGIES``, ``ADAPTERS``), never their names, so a new method joins by declaring its traits;
messages list the entries that fit. Each family's own keys are checked in its module first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..adapters import ADAPTERS
from ..errors import FedtuneError
from ..frameworks import FRAMEWORKS
from ..personalization import PERSONALIZATION
from ..runtimes import RUNTIMES
from ..strategies import STRATEGIES
from ..tasks import TASKS
from .checks import either
from .fed import DATA_ATTACKS, WEIGHT_ATTACKS
from .split import mixed_cuts


def fw(c: Any, trait: str) -> bool:
    return FRAMEWORKS.has(c.framework, trait)


def st(c: Any, trait: str) -> bool:
    return STRATEGIES.has(c.fed.strategy, trait)


def pe(c: Any, trait: str) -> bool:
    return ADAPTERS.has(c.model.peft, trait)


def ta(c: Any, trait: str) -> bool:
    return TASKS.has(c.train.task, trait)


def pz(c: Any, trait: str) -> bool:
    return PERSONALIZATION.has(c.fed.personalization, trait)


def personalizes(c: Any) -> bool:
    return c.fed.personalization != "none"


def _personal_conflict(c: Any) -> str:
    """What does not combine with a client that keeps part of its state: terms and shapes
    that a strategy or rank keys build from the whole global state."""
    if not personalizes(c):
        return ""
    other = [f"fed.strategy={c.fed.strategy}" if st(c, "rank_aware") or st(c, "shaped_like_global") else "",
             "model.client_ranks" if c.model.client_ranks else "", "model.rank_schedule" if c.model.rank_schedule else "",
             "continual.tasks > 1" if c.continual.tasks > 1 else "",
             "clients with different cuts" if mixed_cuts(c.split) else ""]
    return next((o for o in other if o), "")


def outputs_only(c: Any) -> bool:
    """The framework uploads outputs (logits) and no weights: nothing for fed.strategy to aggregate."""
    return fw(c, "uploads_outputs") and not fw(c, "uploads_weights")


def frameworks(*traits: str, without: tuple[str, ...] = ()) -> str:
    """The frameworks that declare every one of ``traits`` and none of ``without``, for a message."""
    return either(n for n in FRAMEWORKS.names
                  if all(FRAMEWORKS.has(n, t) for t in traits) and not any(FRAMEWORKS.has(n, t) for t in without))


def _rank_aggregation_fits(c: Any) -> bool:
    """A rank-aware strategy takes LoRA factors of clients' own ranks, as weights that a
    framework uploads and lets differ per client; frozen A factors leave it nothing to merge."""
    return (pe(c, "rank") and fw(c, "uploads_weights") and fw(c, "client_ranks")
            and not c.model.lora_freeze_a)


def _mixed_cut_conflict(c: Any) -> str:
    """What does not combine with clients of different cuts: they hold different tensors, so they
    are averaged block by block (split.py), a plain sample-weighted mean."""
    other = [f"fed.strategy={c.fed.strategy}" if not st(c, "mean_only") else "",
             "fed.prox_mu" if c.fed.prox_mu else "", "privacy.central_dp" if c.privacy.central_dp else "",
             # a prompt on the client, outside the blocks that are averaged
             f"model.peft={c.model.peft}" if pe(c, "virtual_tokens") and pe(c, "split_cut") else ""]
    return next((o for o in other if o), "") if mixed_cuts(c.split) else ""


Rule = tuple[Callable[[Any], Any], Callable[[Any], str]]  # (broken?, the one-line error)

RULES: tuple[Rule, ...] = (
    (lambda c: fw(c, "uploads_seeds") and not st(c, "mean_only"),
     lambda c: f"fed.strategy={c.fed.strategy!r} aggregates uploaded weights; {c.framework} uploads seed pairs "
               f"and sums them weighted by samples: leave fed.strategy = {either(STRATEGIES.having('mean_only'))}"),
    # The raw-gradient client state would leak past DP-SGD.
    (lambda c: c.privacy.dp_sgd and st(c, "raw_gradients"),
     lambda c: f"privacy.dp_sgd does not combine with fed.strategy={c.fed.strategy} (its client variate "
               "comes from un-noised gradients)"),
    (lambda c: outputs_only(c) and (not st(c, "mean_only") or c.fed.prox_mu),
     lambda c: f"fed.strategy={c.fed.strategy} and fed.prox_mu act on uploaded tunable parameters, "
               f"which {c.framework} does not send; use framework {frameworks('uploads_weights')}"),
    (lambda c: fw(c, "split_cut") and not pe(c, "split_cut"),
     lambda c: f"model.peft={c.model.peft} does not fit split learning's cut; {c.framework} takes "
               f"{', '.join(ADAPTERS.having('split_cut'))}"),
    # The generate task reads the base model's hidden states directly, past PEFT's forward.
    (lambda c: not pe(c, "any_task") and not ta(c, "head"),
     lambda c: f"model.peft={c.model.peft} needs train.task={either(TASKS.having('head'))}; got {c.train.task!r}"),
    (lambda c: c.model.client_ranks and not (pe(c, "rank") and fw(c, "client_ranks")),
     lambda c: f"model.client_ranks needs framework={frameworks('client_ranks')} with model.peft="
               f"{either(ADAPTERS.having('rank'))}; got framework={c.framework}, model.peft={c.model.peft}"),
    (lambda c: c.model.rank_schedule and not (pe(c, "rank") and fw(c, "rank_schedule")),
     lambda c: f"model.rank_schedule needs framework={frameworks('rank_schedule')} with model.peft="
               f"{either(ADAPTERS.having('rank'))}; got framework={c.framework}, model.peft={c.model.peft}"),
    (lambda c: st(c, "rank_aware") and not _rank_aggregation_fits(c),
     lambda c: f"fed.strategy={c.fed.strategy} aggregates LoRA factors: it needs framework="
               f"{frameworks('uploads_weights', 'client_ranks')}, model.peft={either(ADAPTERS.having('rank'))} "
               "and model.lora_freeze_a=false"),
    (lambda c: len(set(c.model.client_ranks)) > 1 and fw(c, "uploads_weights") and not st(c, "rank_aware"),
     lambda c: f"clients of different ranks (model.client_ranks={c.model.client_ranks}) need fed.strategy "
               f"{', '.join(STRATEGIES.having('rank_aware'))}; got {c.fed.strategy!r}"),
    # Their client-side terms are shaped like the global state, which then differs per client.
    (lambda c: (c.model.client_ranks or c.model.rank_schedule or st(c, "rank_aware"))
     and (c.fed.prox_mu or st(c, "shaped_like_global")),
     lambda c: f"fed.prox_mu and fed.strategy={'/'.join(STRATEGIES.having('shaped_like_global'))} do not combine "
               "with heterogeneous or scheduled ranks"),
    (lambda c: c.fed.attack in WEIGHT_ATTACKS and outputs_only(c),
     lambda c: f"fed.attack={c.fed.attack} poisons uploaded weights; {c.framework} uploads outputs: use "
               f"{either(DATA_ATTACKS)}"),
    (lambda c: c.privacy.output_noise_multiplier and fw(c, "uploads_weights") and not fw(c, "uploads_outputs"),
     lambda c: f"privacy.output_noise_multiplier noises what {' and '.join(FRAMEWORKS.having('uploads_outputs'))} "
               f"send; {c.framework} sends weights (use privacy.dp_sgd or privacy.central_dp)"),
    (lambda c: c.privacy.dp_sgd and fw(c, "uploads_seeds"),
     lambda c: f"privacy.dp_sgd clips per-example gradients; {c.framework} takes zeroth-order steps without "
               "them (use privacy.central_dp)"),
    (lambda c: c.privacy.audit and not ta(c, "labelled"),
     lambda c: f"privacy.audit plants labelled canaries: needs train.task={either(TASKS.having('labelled'))}; "
               f"got {c.train.task}"),
    (lambda c: c.privacy.central_dp and outputs_only(c),
     lambda c: f"privacy.central_dp bounds uploaded weight updates; {c.framework} uploads outputs "
               "(use privacy.dp_sgd)"),
    # SecAgg+ is Flower's protocol.
    (lambda c: c.privacy.secagg and not RUNTIMES.has(c.runtime, "flower"),
     lambda c: f"privacy.secagg runs Flower's SecAgg+: use --runtime {either(RUNTIMES.having('flower'))} "
               f"(got {c.runtime})"),
    (lambda c: c.privacy.secagg and not (fw(c, "uploads_weights") and not fw(c, "per_batch")),
     lambda c: f"privacy.secagg gives the server only the sum of weight updates: it needs framework="
               f"{frameworks('uploads_weights', without=('per_batch',))} "
               f"({c.framework} needs each client's own upload)"),
    (lambda c: c.privacy.secagg and not st(c, "mean_only"),
     lambda c: f"privacy.secagg gives the server only the weighted mean: fed.strategy={c.fed.strategy} needs "
               f"each client's own update (use fed.strategy={either(STRATEGIES.having('mean_only'))})"),
    (lambda c: c.privacy.secagg and c.model.client_ranks,
     lambda c: "privacy.secagg sums equal-shaped updates: model.client_ranks gives clients different shapes"),
    (lambda c: c.split.sample == "loss" and not ta(c, "head"),
     lambda c: f"split.sample=loss ranks rows by their classification loss: needs train.task="
               f"{either(TASKS.having('head'))}; "
               f"got {c.train.task!r}"),
    (_mixed_cut_conflict,
     lambda c: f"clients with different cuts (split.client_layers / split.auto) are averaged block by block "
               f"with fed.strategy={either(STRATEGIES.having('mean_only'))}; {_mixed_cut_conflict(c)} does not "
               "combine with them"),
    (lambda c: c.data.partition == "length" and not ta(c, "free_text"),
     lambda c: f"data.partition=length needs train.task={either(TASKS.having('free_text'))}; "
               f"got train.task={c.train.task!r}"),
    # sft rows carry no labels.
    (lambda c: c.kd.align and not ta(c, "labelled"),
     lambda c: f"kd.align works on labelled rows (train.task {either(TASKS.having('labelled'))}); "
               f"got train.task={c.train.task}"),
    (lambda c: c.data.public_skew and not ta(c, "labelled"),
     lambda c: f"data.public_skew works on labelled rows (train.task {either(TASKS.having('labelled'))}); "
               f"got train.task={c.train.task}"),
    (lambda c: c.data.client_test_size and not fw(c, "client_eval"),
     lambda c: f"data.client_test_size scores each client's own model on its own rows: framework="
               f"{frameworks('client_eval')}; got {c.framework!r}"),
    (lambda c: pz(c, "weights") and not fw(c, "personal_weights"),
     lambda c: f"fed.personalization={c.fed.personalization} keeps part of the uploaded weights: framework="
               f"{frameworks('personal_weights')}; got {c.framework!r}"),
    (lambda c: pz(c, "cut") and not fw(c, "split_cut"),
     lambda c: f"fed.personalization={c.fed.personalization} keeps split learning's client part: framework="
               f"{frameworks('split_cut')}; got {c.framework!r}"),
    (lambda c: pz(c, "head") and not ta(c, "head"),
     lambda c: f"fed.personalization={c.fed.personalization} keeps or shares a classification head: train.task="
               f"{either(TASKS.having('head'))}; got {c.train.task!r}"),
    (lambda c: pz(c, "rank") and not pe(c, "rank"),
     lambda c: f"fed.personalization={c.fed.personalization} splits LoRA factors: model.peft="
               f"{either(ADAPTERS.having('rank'))}; got {c.model.peft!r}"),
    (lambda c: pz(c, "virtual_tokens") and not pe(c, "virtual_tokens"),
     lambda c: f"fed.personalization={c.fed.personalization} keeps a soft prompt: model.peft="
               f"{either(ADAPTERS.having('virtual_tokens'))}; got {c.model.peft!r}"),
    (lambda c: pz(c, "halves_rank") and c.model.lora_r % 2,
     lambda c: f"fed.personalization={c.fed.personalization} halves model.lora_r into a shared and a personal adapter: "
               f"it must be even; got {c.model.lora_r}"),
    (_personal_conflict,
     lambda c: f"fed.personalization={c.fed.personalization} does not combine with {_personal_conflict(c)} "
               "(they act on the whole global state, which clients then hold only in part)"),
    (lambda c: c.continual.tasks > 1 and not fw(c, "continual"),
     lambda c: f"continual.tasks > 1 runs under framework {frameworks('continual')}; got {c.framework!r}"),
    (lambda c: c.continual.tasks > 1 and not ta(c, "labelled"),
     lambda c: f"continual.tasks > 1 splits the labels of train.task {either(TASKS.having('labelled'))}; "
               f"got {c.train.task!r}"),
)


def check(cfg: Any) -> None:
    """The first rule that ``cfg`` breaks, as a one-line error."""
    for broken, message in RULES:
        if broken(cfg):
            raise FedtuneError(message(cfg))
