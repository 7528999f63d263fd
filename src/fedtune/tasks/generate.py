"""``generate``: a causal LM fine-tuned instruction-style to write the intent name after the
query; one output row per *answer token* (width = vocabulary). Loss is on the answer tokens
only; an example is correct when greedy decoding reproduces its label exactly."""

from __future__ import annotations

import torch
from torch import nn

from ..data import Batch, Rows
from ..errors import FedtuneError
from .base import TailTask


class GenerateTask(TailTask):
    name = "generate"
    PROMPT = "Query: {text}\nIntent:"

    def __init__(self, tokenizer, label_names: list[str], max_length: int):
        self.tok, self.max_length, self.label_names = tokenizer, max_length, label_names
        eos = tokenizer.eos_token_id
        # The answer is " <label>" then end-of-sequence: exact match needs the model to stop.
        self.answers = [tokenizer(" " + n, add_special_tokens=False)["input_ids"] + [eos] for n in label_names]
        self.answer_len = torch.tensor([len(a) for a in self.answers])
        self.answer_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(a) for a in self.answers], batch_first=True)
        if int(self.answer_len.max()) >= max_length:
            raise FedtuneError(f"data.max_length ({max_length}) is too short for the longest label's tokens")

    def encode(self, rows: Rows) -> list[list[int]]:
        prompts = self.tok([self.PROMPT.format(text=t) for t in rows.texts])["input_ids"]
        # Truncate the prompt, never the answer.
        return [p[: self.max_length - len(self.answers[y])] + self.answers[y] for p, y in zip(prompts, rows.labels)]

    def tail_lengths(self, batch: Batch) -> torch.Tensor:
        return self.answer_len.to(batch.labels.device)[batch.labels]

    def targets(self, batch):
        # The answer tokens follow from the labels alone (``encode`` appends them), so a split
        # learning server gets them without the token ids. Row-major order = ``positions``.
        alen = self.answer_len.to(batch.labels.device)[batch.labels]
        ids = self.answer_ids.to(batch.labels.device)[batch.labels]
        return ids[torch.arange(ids.shape[1], device=ids.device) < alen.unsqueeze(1)]

    def rows_per_example(self, labels):
        return [len(self.answers[y]) for y in labels]

    @torch.no_grad()
    def decode(self, model: nn.Module, batch: Batch, device: torch.device) -> list[str]:
        """Greedy decoding of each example's answer from its prompt alone, one token at a time
        (for inspection and tests; ``evaluate`` gets the same exact-match verdict from one
        teacher-forced pass, since greedy output equals the label iff every step's argmax does)."""
        model.eval()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        eos, longest = self.tok.eos_token_id, int(self.answer_len.max())
        out = []
        for r in range(len(batch.labels)):
            n = int(batch.attention_mask[r].sum()) - int(self.answer_len[batch.labels[r]])
            ids = batch.input_ids[r : r + 1, :n].to(device)
            new: list[int] = []
            for _ in range(longest):
                nxt = int(base(input_ids=ids).logits[0, -1].argmax())
                if nxt == eos:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], 1)
            out.append(self.tok.decode(new).strip())
        return out
