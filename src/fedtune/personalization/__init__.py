"""Personalization (``fed.personalization``): what each client keeps for itself beside the
global model, one file per method, one line each in the registry below (docs/personalization.md).
A method's personal tensors live in the client's state (``ClientResult.state[PERSONAL]``), which
the round loop checkpoints and restores on every runtime and which never enters an upload.

Traits say what a method needs, for the rules across families (config/rules.py): ``weights``:
a framework that uploads the client's tunable weights once a round and lets a method keep some
(framework trait ``personal_weights``); ``head``: a task with a classification head;
``rank``: LoRA factors (model.peft trait ``rank``); ``virtual_tokens``: a soft prompt
(model.peft trait ``virtual_tokens``); ``halves_rank``: model.lora_r holds a shared and a
personal adapter of half its rank each (it must be even); ``cut``: split learning's client part
(framework trait ``split_cut``)."""

from __future__ import annotations

from ..registry import Registry

PERSONALIZATION = Registry("fed.personalization", {
    "none": "fedtune.personalization.base:Personalization",
    "finetune": "fedtune.personalization.finetune:FineTune",
    "head": "fedtune.personalization.head:FedPer",
    "rep": "fedtune.personalization.rep:FedRep",
    "ditto": "fedtune.personalization.ditto:Ditto",
    "lora_b": "fedtune.personalization.lora_b:FedSALoRA",
    "dual_lora": "fedtune.personalization.dual_lora:DualLoRA",
    "prompt": "fedtune.personalization.prompt:PersonalPrompt",
    "client_part": "fedtune.personalization.client_part:ClientPart",
}, titles={"none": "global", "finetune": "FT", "head": "FedPer", "rep": "FedRep", "ditto": "Ditto",
           "lora_b": "FedSA-LoRA", "dual_lora": "FedDPA", "prompt": "pFedPrompt", "client_part": "split, personal client part"}, traits={
    "finetune": ("weights",),
    "head": ("weights", "head"),
    "rep": ("weights", "head"),
    "ditto": ("weights",),
    "lora_b": ("weights", "rank"),
    "dual_lora": ("weights", "rank", "halves_rank"),
    "prompt": ("weights", "head", "virtual_tokens"),
    "client_part": ("cut",),
})

PERSONAL = "personal"  # the client's own tensors in its ClientResult.state
KEY = "client_test_accuracy"  # the client records' score of the model each client uses, on its own rows
LOSS = "client_test_loss"  # its loss there (sft: the response loss)


def make(cfg):
    return PERSONALIZATION.load(cfg.fed.personalization)(cfg)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the sorted values (numpy's default)."""
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def client_stats(records: list[dict]) -> dict[str, float]:
    """The server record's view of the round's clients' own-test scores: the accuracy's (or the
    sft metric's) mean, worst and 10th percentile, the loss's mean and worst (empty when no
    client record has them)."""
    values = [r[KEY] for r in records if r.get(KEY) is not None]
    if not values:
        return {}
    out = {f"{KEY}_mean": sum(values) / len(values), f"{KEY}_worst": min(values), f"{KEY}_p10": percentile(values, 10)}
    losses = [r[LOSS] for r in records if r.get(LOSS) is not None]
    if losses:
        out.update({f"{LOSS}_mean": sum(losses) / len(losses), f"{LOSS}_worst": max(losses)})
    return out
