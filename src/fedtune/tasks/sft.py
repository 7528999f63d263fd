"""``sft``: supervised fine-tuning of a causal LM on prompt/response rows (sft_data.py).

Each example is the formatted prompt followed by the response tokens and end-of-sequence; the
loss is on the response tokens only, one output row per response token (width = vocabulary),
exactly as ``generate`` does for label names. The prompt is formatted with the tokenizer's chat
template when it has one, else with the plain template ``PLAIN`` below.

``labels`` of a batch are the response token ids, padded with -100 to ``data.max_length``:
with right padding the response is the last ``n`` real tokens of each row, so a split learning
server finds the positions and targets from the attention mask and labels alone and never sees
the input ids (it does see the response ids: they are the labels, as in SplitFed).

``data.max_length`` truncates the prompt first (its start: the end carries the question and the
assistant header); a response is cut only when it alone does not fit, and both are counted
(``truncated``) and reported once."""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch
from ..errors import FedtuneError
from ..sft_data import SftRows, Turns
from .base import TailTask

log = logging.getLogger(__name__)
IGNORE = -100
# The plain template, for tokenizers without a chat template: one header per turn.
PLAIN = {"system": "### System:\n{}\n\n", "user": "### Instruction:\n{}\n\n", "assistant": "### Response:\n{}\n\n"}
PLAIN_ANSWER = "### Response:\n"


def with_system(turns: Turns, system: str) -> Turns:
    """``data.system_prompt`` as the first turn, unless the row brings a system turn of its own."""
    if system and not (turns and turns[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *turns]
    return list(turns)


def format_prompt(tok, turns: Turns, system: str = "") -> list[int]:
    """Token ids of the conversation up to where the assistant's answer starts, with ``system``
    (data.system_prompt) as its system turn; empty = none, the chat template's default removed."""
    turns = with_system(turns, system)
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        if turns[0]["role"] != "system" and default_system(tok):
            text = text.replace(default_system(tok), "", 1)
        return tok(text, add_special_tokens=False)["input_ids"]
    text = "".join(PLAIN.get(t["role"], f"### {t['role'].title()}:\n{{}}\n\n").format(t["content"]) for t in turns)
    return tok(text + PLAIN_ANSWER)["input_ids"]


def default_system(tok) -> str:
    """The system turn a chat template writes when a conversation has none (SmolLM2: "You are a
    helpful AI assistant named SmolLM..."), as text, or "" when it writes none."""
    return _default_system(tok, tok.chat_template)


@functools.lru_cache(maxsize=8)
def _default_system(tok, template: str) -> str:
    mark, user = "\x00SYSTEM\x00", [{"role": "user", "content": "hi"}]
    try:
        plain = tok.apply_chat_template(user, tokenize=False)
        head, tail = tok.apply_chat_template([{"role": "system", "content": mark}, *user], tokenize=False).split(mark)
        alone = tok.apply_chat_template([{"role": "system", "content": mark}], tokenize=False)
    except Exception:  # a template without system turns raises (of any type): it has no default either
        return ""
    if not (plain.startswith(head) and plain.endswith(tail) and len(plain) >= len(head) + len(tail)):
        return ""
    opens, closes = alone.split(mark)
    # What a template writes before every conversation (Llama 3's bos_token) is not the system turn's.
    lead = tok.bos_token if tok.bos_token and "bos_token" in tok.chat_template and opens.startswith(tok.bos_token) else ""
    return opens[len(lead):] + plain[len(head) : len(plain) - len(tail)] + closes


def chat_template_with_system(tok, system: str) -> str | None:
    """The tokenizer's chat template rewritten to do what ``format_prompt`` does with ``system``,
    for a standalone model (``fedtune export``); None when it cannot be (the default then stays)."""
    template, default = tok.chat_template, default_system(tok)
    if default:
        if default not in template:
            return None
        template = template.replace(default, "", 1)
    if system:
        first = "{%- if messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', 'content': "
        template = f"{first}{json.dumps(system)}}}] + messages %}}{{%- endif %}}{template}"
    return template


def context_size(config) -> int | None:
    """The most positions a model's config allows (None when it names no limit)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_context(width: int, max_new: int, positions: int | None) -> tuple[int, int]:
    """-> (prompt tokens kept, new tokens) so that generation stays within ``positions``: the
    answer is capped to the room the prompt leaves, but keeps at least half the positions (up to
    ``max_new``); the prompt then loses its start."""
    if not positions or width + max_new <= positions:
        return width, max_new
    new = max(min(max_new, positions - width), min(max_new, positions // 2))
    return min(width, positions - new), new


_SAID: set[str] = set()


def say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)


def context_note(name: str, positions: int, max_new: int, key: str = "eval.max_new_tokens") -> str:
    return (f"{name} has {positions} positions: answers are capped at {positions} - prompt tokens (at least "
            f"{min(max_new, positions // 2)}; {key}={max_new}), and longer prompts are cut from the left")


def check_context(cfg) -> None:
    """Before a run: data.max_length must fit the model, and generation's cap is said once."""
    positions = model_positions(cfg.model.name)
    if positions is None:
        return
    if cfg.data.max_length > positions:
        raise FedtuneError(f"data.max_length ({cfg.data.max_length}) exceeds the {positions} positions of "
                           f"{cfg.model.name}; set data.max_length <= {positions}")
    if cfg.data.max_length + cfg.eval.max_new_tokens > positions and cfg.eval.metric != "none":
        say_once(context_note(cfg.model.name, positions, cfg.eval.max_new_tokens))


def model_positions(name: str) -> int | None:
    """The model's position limit from its config alone (no weights), None when unreadable."""
    from .. import models

    try:
        kind, where = models.resolve(name)
        if kind == "tiny":
            return context_size(models.TINY[name])
        from transformers import AutoConfig

        return context_size(AutoConfig.from_pretrained(where, local_files_only=kind == "dir"))
    except Exception:  # unreadable here: the run's own checks report the model; generation still caps
        return None


def final_number(text: str) -> str | None:
    """The final answer: what follows '####' (GSM8K), else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    if not nums:
        return None
    value = nums[0] if "####" in text else nums[-1]
    value = value.replace(",", "")
    return str(float(value)) if "." in value else str(int(value))


class SftTask(TailTask):
    name = "sft"
    # eval.metric = none logs no generated metric: test_accuracy is then the token accuracy.
    metric_labels = {"test_final_number": "exact match", "test_rougeL": "rougeL", "test_token_accuracy": "token accuracy"}

    def __init__(self, tokenizer, label_names: list[str], max_length: int):
        self.tok, self.max_length = tokenizer, max_length
        self.truncated = {"prompts": 0, "responses": 0}
        self.final_answers = True  # every response seen holds a GSM8K-style '#### N' (eval.metric=auto)

    @classmethod
    def load_data(cls, cfg):
        fed = super().load_data(cfg)
        check_context(cfg)
        return fed

    @classmethod
    def read_data(cls, cfg, public_rows: bool):
        from ..sft_data import load

        return load(cfg.data, cfg.fed.clients, cfg.seed, public_rows)

    # ---- encoding
    def encode(self, rows: SftRows) -> list[list[int]]:
        """Token ids of prompt + response; sets ``rows.labels`` to the response ids (padded)."""
        eos, out, labels = self.tok.eos_token_id, [], []
        before = dict(self.truncated)
        self.final_answers &= all("####" in r for r in rows.responses)
        system = self.run_cfg.data.system_prompt if self.run_cfg else ""
        for turns, response in zip(rows.turns, rows.responses):
            prompt = format_prompt(self.tok, turns, system)
            answer = self.tok(response, add_special_tokens=False)["input_ids"] + [eos]
            if len(answer) > self.max_length - 1:  # one prompt token must precede the first target
                answer = answer[: self.max_length - 1]
                self.truncated["responses"] += 1
            if len(prompt) + len(answer) > self.max_length:
                prompt = prompt[len(prompt) + len(answer) - self.max_length :]
                self.truncated["prompts"] += 1
            out.append(prompt + answer)
            labels.append(torch.tensor(answer + [IGNORE] * (self.max_length - len(answer))))
        rows.labels = labels
        cut = {k: self.truncated[k] - before[k] for k in before}
        if any(cut.values()):
            log.warning("data.max_length=%d truncated %d prompts and %d responses of %d rows", self.max_length,
                        cut["prompts"], cut["responses"], len(rows))
        return out

    def response_len(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE).sum(1)

    # ---- the task protocol
    def tail_lengths(self, batch: Batch) -> torch.Tensor:
        return self.response_len(batch.labels)

    def targets(self, batch):
        return batch.labels[batch.labels != IGNORE]  # row-major: the order of ``positions``

    def rows_per_example(self, labels):
        return [int((torch.as_tensor(y) != IGNORE).sum()) for y in labels]

    # ---- evaluation
    def metric_name(self) -> str:
        metric = self.run_cfg.eval.metric if self.run_cfg else "auto"
        if metric == "auto":
            return "final_number" if self.final_answers else "rougeL"
        return metric

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[list[int]], device, max_new_tokens: int) -> list[str]:
        """Greedy answers to prompt token ids, batched with left padding."""
        model.eval()
        positions, longest = context_size(model.config), max(len(p) for p in prompts)
        keep, new = fit_context(longest, max_new_tokens, positions)
        if (keep, new) != (longest, max_new_tokens):
            say_once(context_note(self.run_cfg.model.name if self.run_cfg else "the model", positions, max_new_tokens))
        max_new_tokens = new
        prompts = [p[len(p) - keep :] if len(p) > keep else p for p in prompts]
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad, eos_token_id=self.tok.eos_token_id)
        return [self.tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]

    def generate_sorted(self, model: nn.Module, prompts: list[list[int]], device, max_new_tokens: int,
                        batch_size: int) -> list[str]:
        """``generate`` in batches of prompts of similar length (the least left padding), the
        answers in the prompts' order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, answer in zip(chunk, self.generate(model, [prompts[i] for i in chunk], device, max_new_tokens)):
                answers[i] = answer
        return answers

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch], device: torch.device) -> dict:
        """-> loss and perplexity per response token, the task metric by greedy generation
        (``eval.metric``) as ``accuracy`` and under its own name, and ``samples``."""
        model.eval()
        ev_cfg = self.run_cfg.eval if self.run_cfg else None
        loss_sum, tokens, right = 0.0, 0, 0
        prompts, references, rows = [], [], []
        for batch in batches:
            b = batch.to(device)
            out = self.outputs(model, b).float()
            tgt = self.targets(b)
            loss_sum += F.cross_entropy(out, tgt, reduction="sum").item()
            right += int((out.argmax(-1) == tgt).sum())
            tokens += len(tgt)
            n = self.response_len(b.labels)
            for r in range(len(n)):
                start = int(b.attention_mask[r].sum()) - int(n[r])
                prompts.append(b.input_ids[r, :start].tolist())
                references.append(self.tok.decode(b.labels[r, : int(n[r])].tolist(), skip_special_tokens=True).strip())
            rows += batch.index.tolist()
        # The test rows' own order (batches may come sorted by length): generate_size and the
        # samples always mean the first rows of the test set.
        order = sorted(range(len(rows)), key=rows.__getitem__)
        prompts, references = [prompts[i] for i in order], [references[i] for i in order]
        loss = loss_sum / max(tokens, 1)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": right / max(tokens, 1)}
        metric = self.metric_name()
        if metric == "none" or not prompts:
            return {**result, "accuracy": result["token_accuracy"]}
        size = ev_cfg.generate_size if ev_cfg and ev_cfg.generate_size else len(prompts)
        max_new = ev_cfg.max_new_tokens if ev_cfg else 256
        bs = self.run_cfg.train.eval_batch_size if self.run_cfg else 16
        answers = self.generate_sorted(model, prompts[:size], device, max_new, bs)
        scores = score(metric, answers, references[: len(answers)])
        samples = [
            {"prompt": self.tok.decode(p, skip_special_tokens=True), "reference": ref, "answer": ans, metric: s}
            for p, ref, ans, s in zip(prompts, references, answers, scores)
        ][: ev_cfg.samples if ev_cfg else 0]
        value = sum(scores) / len(scores)
        return {**result, "accuracy": value, metric: value, "samples": samples}


def score(metric: str, answers: list[str], references: list[str]) -> list[float]:
    if metric == "final_number":
        return [float(final_number(a) is not None and final_number(a) == final_number(r))
                for a, r in zip(answers, references)]
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise FedtuneError("eval.metric=rougeL needs the rouge-score package (pip install rouge-score)") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]


def write_samples(run_dir: str | Path, rnd: int, samples: list[dict]) -> Path:
    """Written then renamed: a resumed run rewrites the round's file whole."""
    out = Path(run_dir) / "samples" / f"round-{rnd:03d}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"round": rnd, **s}) + "\n" for s in samples))
    tmp.replace(out)
    return out
