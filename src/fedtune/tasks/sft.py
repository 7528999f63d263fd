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


def format_prompt(tok, turns: Turns) -> list[int]:
    """Token ids of the conversation up to where the assistant's answer starts."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    text = "".join(PLAIN.get(t["role"], f"### {t['role'].title()}:\n{{}}\n\n").format(t["content"]) for t in turns)
    return tok(text + PLAIN_ANSWER)["input_ids"]


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

    def __init__(self, tokenizer, label_names: list[str], max_length: int):
        self.tok, self.max_length = tokenizer, max_length
        self.truncated = {"prompts": 0, "responses": 0}
        self.final_answers = True  # every response seen holds a GSM8K-style '#### N' (eval.metric=auto)

    @classmethod
    def load_data(cls, cfg):
        from ..sft_data import load

        return load(cfg.data, cfg.fed.clients, cfg.seed)

    # ---- encoding
    def encode(self, rows: SftRows) -> list[list[int]]:
        """Token ids of prompt + response; sets ``rows.labels`` to the response ids (padded)."""
        eos, out, labels = self.tok.eos_token_id, [], []
        before = dict(self.truncated)
        self.final_answers &= all("####" in r for r in rows.responses)
        for turns, response in zip(rows.turns, rows.responses):
            prompt = format_prompt(self.tok, turns)
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
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=self.tok.eos_token_id)
        return [self.tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch], device: torch.device) -> dict:
        """-> loss and perplexity per response token, the task metric by greedy generation
        (``eval.metric``) as ``accuracy`` and under its own name, and ``samples``."""
        model.eval()
        ev_cfg = self.run_cfg.eval if self.run_cfg else None
        loss_sum, tokens, right = 0.0, 0, 0
        prompts, references = [], []
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
        loss = loss_sum / max(tokens, 1)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": right / max(tokens, 1)}
        metric = self.metric_name()
        if metric == "none" or not prompts:
            return {**result, "accuracy": result["token_accuracy"]}
        size = ev_cfg.generate_size if ev_cfg and ev_cfg.generate_size else len(prompts)
        max_new = ev_cfg.max_new_tokens if ev_cfg else 256
        bs = self.run_cfg.train.eval_batch_size if self.run_cfg else 16
        answers = []
        for start in range(0, min(size, len(prompts)), bs):
            answers += self.generate(model, prompts[start : min(start + bs, size)], device, max_new)
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
