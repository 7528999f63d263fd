"""The lm-eval model for ``fedtune eval`` (lm_evaluation.py): lm-eval's HFLM over the run's
model, whose shipped fedtune-format tasks are answered exactly as the run's sft metric answers
(tasks/sft.py: prompt format, truncation, batches, greedy generation). Imported only when
lm-eval is installed."""

from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM

from .frameworks.base import pick_device
from .lm_eval_tasks import FEDTUNE_FORMAT
from .tasks import make as make_task
from .tasks.sft import format_prompt


class FedtuneLM(HFLM):
    def __init__(self, cfg, model, tok):
        device = pick_device(cfg.train.device)
        super().__init__(pretrained=model.to(device), tokenizer=tok, batch_size=cfg.train.eval_batch_size)
        self.cfg, self.fed_model, self.tok = cfg, model, tok
        self.task = make_task("sft", tok, [], cfg.data.max_length, cfg)

    def prompt(self, question: str, answer: str) -> list[int]:
        """The prompt ids as the run's encoding makes them: cut from its start when the prompt and the
        response (with end-of-sequence, itself cut to data.max_length - 1) exceed data.max_length."""
        ids = format_prompt(self.tok, [{"role": "user", "content": question.strip()}], self.cfg.data.system_prompt)
        n = min(len(self.tok(answer.strip(), add_special_tokens=False)["input_ids"]) + 1, self.cfg.data.max_length - 1)
        return ids[len(ids) + n - self.cfg.data.max_length :] if len(ids) + n > self.cfg.data.max_length else ids

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        mine = [i for i, r in enumerate(requests) if r.task_name in FEDTUNE_FORMAT]
        rest = [i for i, r in enumerate(requests) if r.task_name not in FEDTUNE_FORMAT]
        out: list[str] = [""] * len(requests)
        if rest:
            for i, answer in zip(rest, super().generate_until([requests[i] for i in rest], disable_tqdm)):
                out[i] = answer
        prompts = [self.prompt(requests[i].args[0], str(requests[i].doc["answer"])) for i in mine]
        bs, device = self.cfg.train.eval_batch_size, next(self.fed_model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(prompts), bs):
                answers = self.task.generate(self.fed_model, prompts[start : start + bs], device,
                                             self.cfg.eval.max_new_tokens)
                for i, answer in zip(mine[start : start + bs], answers):
                    out[i] = answer
        return out
