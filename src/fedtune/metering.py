"""Metering: what the client's work costs (analytic FLOPs, seconds, peak memory). What a message
costs on the wire is ``len(wire.serialize(msg))``."""

from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adapters.base import adapter_of
from .errors import FedtuneError

# --------------------------------------------------------------------------- time and memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the process peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Usage:
    seconds: float = 0.0
    peak_mem_bytes: int = 0


@contextmanager
def measure(device: torch.device | str = "cpu", interval: float = 0.05):
    """Wall seconds and peak memory of the block. On CUDA: peak allocated device memory.
    On CPU: peak resident set size of the process, sampled every ``interval`` seconds; the
    shared frozen base model is part of it, as it would be on a real client. A training step's
    activations live from its forward to the end of its backward, far longer than 50 ms on a
    CPU; a sampler waking every 5 ms preempts the compute threads and cost about 2% of a 2-core
    machine's training throughput. (The kernel's exact high-water mark is no option: resetting
    it per block would also reset the process's ``ru_maxrss`` that callers may read.)"""
    usage = Usage()
    cuda = torch.device(device).type == "cuda"
    stop = threading.Event()
    peak = [_rss_bytes()]

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], _rss_bytes())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        if cuda:
            torch.cuda.synchronize()
            usage.peak_mem_bytes = torch.cuda.max_memory_allocated()
        else:
            stop.set()
            thread.join()
            usage.peak_mem_bytes = max(peak[0], _rss_bytes())
        usage.seconds = time.perf_counter() - start


# --------------------------------------------------------------------------- FLOPs
#
# The count is analytic: it reads layer shapes off the model and applies the textbook rules
# for matrix products, which are >99% of a transformer's arithmetic:
#   forward of y = x W (x: T x in, W: in x out)   2*T*in*out
#   backward, gradient w.r.t. x                   2*T*in*out  (only where x needs a gradient)
#   backward, gradient w.r.t. W                   2*T*in*out  (only for trainable W: LoRA, head)
#   attention per block, forward                  4*B*L^2*d   (Q K^T and P V)
#   attention per block, backward                 8*B*L^2*d
# T = B*L tokens (padded length: padded positions are computed too). Heads of encoder models
# (BERT's pooler/classifier) see one token per sequence. With LoRA, nothing below the first
# adapted block needs a gradient, and in that block the projections that read the block's
# input (q/k/v) need no input gradient. tests/test_metering.py checks this against
# torch.utils.flop_counter.FlopCounterMode.
#
# PEFT methods other than LoRA change the count in four places (tests/test_metering.py checks each):
#   IA3      elementwise scales, no matmul of their own; gradients still flow from the first block
#            that holds one, like LoRA.
#   DoRA     per adapted layer and forward, the product B A (computed as B(A(I)), 2*r*in*(in+out),
#            detached: no backward) for the column norms; while training with LoRA dropout the base
#            product x W is recomputed on the dropped-out input (one more forward matmul, and its
#            input gradient; with fan_in_fan_out (GPT-2's Conv1D) peft wraps the transposed frozen
#            weight in a new nn.Parameter, which requires grad, so its weight gradient is computed too).
#   prompt   n virtual tokens are prepended: every token-wise product and attention sees L + n
#            tokens, and since the prompt sits below block 0 every block needs its input gradient.
#   prefix   n virtual keys/values per layer: projections see L tokens, attention L queries x
#            (L + n) keys; the prefix in every block makes every block backpropagate attention.

_BLOCK = re.compile(r"\.(?:h|layers|layer|blocks|block)\.(\d+)\.")
_READS_BLOCK_INPUT = re.compile(r"\.(c_attn|q_proj|k_proj|v_proj|query|key|value|qkv_proj|Wqkv)(\.|$)")


def _matmul_modules(model: nn.Module):
    """(name, in, out, trainable) for every weight matrix that runs in forward."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in model.named_modules():
        if ".original_module" in name or name.endswith("original_module"):
            continue  # peft keeps an unused copy of a head it trains
        if isinstance(mod, nn.Linear):
            yield name, mod.in_features, mod.out_features, mod.weight.requires_grad
        elif isinstance(mod, Conv1D):
            fan_in, fan_out = mod.weight.shape
            yield name, fan_in, fan_out, mod.weight.requires_grad


def _attention_width(config) -> int:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    head_dim = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    ) // heads
    return heads * head_dim


def _num_blocks(config) -> int:
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")


def _base_config(model: nn.Module):
    return getattr(model, "config", None) or model.base_model.model.config


@dataclass(frozen=True)
class FlopModel:
    """A model's shape summary for counting, computed once per model."""

    matmuls: tuple  # (block or -1, per_sequence, in, out, trainable, reads_block_input)
    blocks: int
    attn_width: int
    first_trainable_block: int  # -1: something below block 0 trains (a prompt)
    prompt_tokens: int = 0  # virtual tokens prepended to the input (prompt tuning)
    prefix_tokens: int = 0  # virtual keys/values in every layer's attention (prefix tuning)
    dora: tuple = ()  # (block, in, out, r, fan_in_fan_out) of each DoRA layer
    dora_dropout: bool = False  # DoRA recomputes x W on the dropped-out input while training

    @classmethod
    def of(cls, model: nn.Module) -> "FlopModel":
        config = _base_config(model)
        encoder = not getattr(config, "is_decoder", False) and config.model_type in (
            "bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta",
        )
        rows = []
        for name, fin, fout, trainable in _matmul_modules(model):
            m = _BLOCK.search("." + name + ".")
            block = int(m.group(1)) if m else -1
            per_seq = block < 0 and encoder
            # A LoRA B matrix reads A's output, not the block's input, so it needs an input gradient.
            reads_input = bool(_READS_BLOCK_INPUT.search(name)) and ".lora_B." not in name + "."
            rows.append((block, per_seq, fin, fout, trainable, reads_input))
        # Any trainable tensor counts (IA3 vectors and DoRA magnitudes are not matmul weights).
        trainable_blocks = [int(m.group(1)) for n, p in model.named_parameters()
                            if p.requires_grad and (m := _BLOCK.search("." + n + "."))]
        first = min(trainable_blocks) if trainable_blocks else _num_blocks(config)
        adapter = adapter_of(model)  # the PEFT method says where its virtual tokens sit
        prompt = adapter.prompt_tokens if adapter else 0
        prefix = adapter.prefix_tokens if adapter else 0
        if prompt:
            first = -1
        if prefix:
            first = 0
        dora = []
        for name, mod in model.named_modules():
            if getattr(mod, "lora_magnitude_vector", None) and "default" in mod.lora_magnitude_vector:
                m = _BLOCK.search("." + name + ".")
                a = mod.lora_A["default"]
                dora.append((int(m.group(1)) if m else -1, a.in_features, mod.lora_B["default"].out_features,
                             a.out_features, bool(mod.fan_in_fan_out)))
        peft = getattr(model, "peft_config", {}).get("default")
        dropout = bool(dora) and getattr(peft, "lora_dropout", 0.0) > 0
        return cls(tuple(rows), _num_blocks(config), _attention_width(config), first, prompt, prefix,
                   tuple(dora), dropout)

    def count(self, batch: int, length: int, train: bool, blocks: range | None = None, head: bool = True) -> int:
        """FLOPs of one batch (batch x length tokens); forward only unless train.
        ``blocks`` limits the count to those transformer blocks (split learning); ``head``
        says whether the modules outside the blocks (the output head) are included."""
        length += self.prompt_tokens
        tokens = batch * length
        total = 0
        for block, per_seq, fin, fout, trainable, reads_input in self.matmuls:
            if block >= 0 and blocks is not None and block not in blocks:
                continue
            if block < 0 and not head:
                continue
            t = batch if per_seq else tokens
            mm = 2 * t * fin * fout
            total += mm
            if not train:
                continue
            total += mm * self._needs_input_grad(block, reads_input)
            total += mm * trainable
        for block, fin, fout, r, weight_grad in self.dora:
            if blocks is not None and block not in blocks:
                continue
            total += 2 * r * fin * (fin + fout)  # B(A(I)) for the norms, detached
            if train and self.dora_dropout:
                mm = 2 * tokens * fin * fout
                total += mm + mm * self._needs_input_grad(block, True) + mm * weight_grad
        for block in blocks if blocks is not None else range(self.blocks):
            attn = 4 * batch * length * (length + self.prefix_tokens) * self.attn_width
            total += attn
            if train and block >= self.first_trainable_block:
                total += 2 * attn
        return total

    def _needs_input_grad(self, block: int, reads_input: bool) -> bool:
        """Whether a product in ``block`` (-1: outside the blocks) backpropagates to its input."""
        if block < 0:
            return self.first_trainable_block < self.blocks
        return block > self.first_trainable_block or (block == self.first_trainable_block and not reads_input)
