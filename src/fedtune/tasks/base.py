"""Tasks: what a model is asked to output, and everything that depends on it: how a text and
its label become token ids, which outputs the loss and accuracy read, and what they cost.

- ``classify``: a sequence-classification head; one output row per example (width = labels).
- ``generate``: a causal LM fine-tuned instruction-style to write the intent name after the
  query; one output row per *answer token* (width = vocabulary). Loss is on the answer tokens
  only; an example is correct when greedy decoding reproduces its label exactly.
- ``sft``: a causal LM fine-tuned on prompt/response rows (sft_data.py); one output row per
  response token, loss on the response only; evaluated by ``eval.metric`` on generated answers.

``classify`` and ``generate`` keep the class index as ``labels``: with right padding the answer
is the last ``len(answer)`` tokens of each row, so its positions follow from the label alone.
``sft``'s ``labels`` are the response token ids, padded with -100.

Every framework goes through ``Task.outputs/loss/evaluate/flops`` (split learning's server
applies ``from_hidden`` to its part's final hidden states); KD exchanges the rows of
``outputs`` on the public set, so its payload grows from labels to vocabulary under generate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch, Rows
from ..errors import FedtuneError
from ..metering import FlopModel


def reads_public_rows(framework: str) -> bool:
    """Whether a framework learns from data.public rows: one whose outputs on them go up (kd).
    Split's outputs are its private rows' activations at the cut."""
    from ..frameworks import FRAMEWORKS

    return FRAMEWORKS.has(framework, "public_rows")


class Task:
    name: str
    run_cfg = None  # the run's RunConfig (tasks.make sets it): settings a task's evaluation reads

    # What ``test_accuracy`` measures, as console lines, the end table, sweep lines and the adapter
    # README name it: the label of the first of these keys a server record holds, else "accuracy"
    # (tasks.metric_label).
    metric_labels: dict[str, str] = {}

    @classmethod
    def load_data(cls, cfg):
        """The run's rows (data.FedData); tasks with rows of their own kind override ``read_data``.
        Auto sizes in ``cfg.data`` become the numbers chosen, so config.toml records them."""
        fed = cls.read_data(cfg, reads_public_rows(cfg.framework))
        if cfg.kd.public_per_round > cfg.data.public_size:
            raise FedtuneError(f"kd.public_per_round must be in [0, data.public_size={cfg.data.public_size}] "
                               f"(0 = all); got {cfg.kd.public_per_round}")
        return fed

    @classmethod
    def read_data(cls, cfg, public_rows: bool):
        from ..data import load

        return load(cfg.data, cfg.fed.clients, cfg.seed, public_rows)

    def encode(self, rows: Rows) -> list[list[int]]:
        """Token ids of each example (truncated, unpadded)."""
        raise NotImplementedError

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The logits the task reads: (rows, width), rows in batch order."""
        raise NotImplementedError

    def targets(self, batch: Batch) -> torch.Tensor:
        """The correct class of each output row."""
        raise NotImplementedError

    def row_sample(self, batch: Batch) -> torch.Tensor:
        """For each output row, the position in the batch of the example it belongs to."""
        raise NotImplementedError

    def rows_per_example(self, labels: list[int]) -> list[int]:
        raise NotImplementedError

    def from_hidden(self, model: nn.Module, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``outputs`` from the final hidden states (after the final norm), (batch, length, hidden):
        what split learning's server part produces."""
        raise NotImplementedError(f"task {self.name} has no head on the final hidden states")

    def flops(self, fm: FlopModel, batch: Batch, train: bool, blocks: range | None = None) -> int:
        """FLOPs of ``outputs`` (and its backward if train); ``blocks`` as in ``FlopModel.count``."""
        return fm.count(*batch.shape, train=train, blocks=blocks)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.outputs(model, batch), self.targets(batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch], device: torch.device) -> dict[str, float]:
        """-> accuracy (an example is right when all its rows are) and mean loss per row."""
        model.eval()
        loss_sum, rows, correct, examples = 0.0, 0, 0, 0
        for batch in batches:
            b = batch.to(device)
            out = self.outputs(model, b).float()
            tgt = self.targets(b)
            loss_sum += F.cross_entropy(out, tgt, reduction="sum").item()
            rows += len(tgt)
            wrong = torch.zeros(len(b.labels), device=out.device)
            wrong.index_add_(0, self.row_sample(b), (out.argmax(-1) != tgt).float())
            correct += int((wrong == 0).sum())
            examples += len(b.labels)
        return {"accuracy": correct / max(examples, 1), "loss": loss_sum / max(rows, 1)}


class TailTask(Task):
    """A causal LM task whose loss reads the predictions of each row's last ``tail_lengths``
    real tokens (the answer of ``generate``, the response of ``sft``). The vocabulary projection
    runs at those positions only (it dominates small models with a large vocabulary), and
    ``flops`` counts exactly that."""

    def tail_lengths(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def positions(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) of every logit that predicts a tail token (position + 1), row-major."""
        n = self.tail_lengths(batch)
        length = batch.attention_mask.sum(1)
        rows = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
        first = torch.repeat_interleave(length - n - 1, n)
        offset = torch.arange(len(rows), device=n.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        return rows, first + offset

    def outputs(self, model, batch):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return self.from_hidden(model, hidden, batch)

    def from_hidden(self, model, hidden, batch):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        rows, pos = self.positions(batch)
        return base.get_output_embeddings()(hidden[rows, pos])

    def row_sample(self, batch):
        return self.positions(batch)[0]

    def flops(self, fm, batch, train, blocks=None):
        tokens = int(self.tail_lengths(batch).sum())
        body = fm.count(*batch.shape, train=train, blocks=blocks, head=False)
        return body + fm.count(tokens, 1, train=train, blocks=range(0), head=True)
