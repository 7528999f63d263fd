"""kd's output codes on a vocabulary: bytes per response token against reconstruction quality.

The public payload of ``--framework kd --task sft`` is one row of logits per response token
(SmolLM2: 49,152 wide). This takes the untrained model's logits on the first N public GSM8K rows,
exactly as kd's server computes them (KDFramework.public_outputs), encodes them with each code
(kd.encode_outputs: kd.logit_rank, kd.logit_topk, kd.logit_dtype), serializes them as they would
travel (wire.serialize), decodes them (kd.decode_outputs) and reports:

- bytes per response token: len(serialize(Message(code))) / rows;
- KL(true || decoded) at the kd temperature, nats, mean per token (true = softmax(logits / T));
- top-1 agreement: how often the decoded distribution's argmax is the true one.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python benchmarks/kd_logit_codes.py \
        --data /work/shared/data/gsm8k --rows 16 --out benchmarks/kd_logit_codes.md
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from fedtune import config as configlib
from fedtune.frameworks import get
from fedtune.frameworks.base import Context
from fedtune.frameworks.kd import decode_outputs, encode_outputs
from fedtune.wire import Message, serialize

CODES = [dict(logit_rank=k) for k in (4, 16, 64)] + [dict(logit_topk=k) for k in (16, 64)]


def public_logits(data: str, rows: int, model: str) -> tuple[torch.Tensor, configlib.RunConfig]:
    cfg = configlib.build_config("demo", Path(__file__).parents[1] / "experiments" / "sft.toml", {
        "framework": "kd", "model.name": model, "data.path": data, "data.public_size": rows,
        "data.private_size": 3, "data.test_size": 1, "train.threads": 1, "train.eval_batch_size": 4,
        "kd.logit_topk": 0, "kd.logit_dtype": "fp32"})
    fw = get("kd")(Context.build(cfg))
    logits, _ = fw.public_outputs()
    return logits, cfg


def quality(logits: torch.Tensor, decoded: torch.Tensor, temperature: float) -> tuple[float, float]:
    true = torch.log_softmax(logits.double() / temperature, -1)
    kl = (true.exp() * (true - decoded.double().clamp_min(1e-30).log())).sum(-1)
    return float(kl.mean()), float((decoded.argmax(-1) == logits.argmax(-1)).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/shared/data/gsm8k")
    ap.add_argument("--rows", type=int, default=16, help="public GSM8K rows (each gives one row per response token)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logits, cfg = public_logits(args.data, args.rows, args.model)
    rows, width = logits.shape
    t = cfg.kd.temperature
    lines = [f"| code | dtype | bytes / token | vs fp32 dense | KL(true ‖ decoded), nats/token | top-1 agreement | "
             f"encode s |", "|---|---|---|---|---|---|---|"]
    dense = None
    for code in [{}] + CODES:
        for dtype in (("fp32", "fp16", "int8") if not code else ("fp16", "int8")):
            kd = dataclasses.replace(cfg.kd, **{"logit_topk": 0, "logit_rank": 0, "logit_dtype": dtype, **code})
            start = time.perf_counter()
            tensors = encode_outputs(logits, kd)
            seconds = time.perf_counter() - start
            size = len(serialize(Message(tensors))) / rows
            dense = dense or size
            kl, top1 = quality(logits, decode_outputs(tensors, kd, rows, width), t)
            name = ", ".join(f"`kd.{k} = {v}`" for k, v in code.items()) or "dense"
            lines.append(f"| {name} | {dtype} | {size:,.0f} | {size / dense:.4f} | {kl:.4f} | {top1:.3f} | "
                         f"{seconds:.1f} |")
            print(lines[-1], flush=True)
    probs = torch.softmax(logits.double() / t, -1)
    tail = ", ".join(f"k = {k}: {float(1 - probs.topk(k, -1).values.sum(-1).mean()):.3f}" for k in (16, 64))
    head = (f"{args.model}, {args.rows} public GSM8K rows -> {rows} response tokens x {width} logits, "
            f"kd.temperature = {t}, untrained model. True probability mass at T outside the top k, "
            f"mean per token: {tail}")
    print(head)
    if args.out:
        args.out.write_text(head + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
