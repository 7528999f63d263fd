"""KD-FedLLM logit compression: MB per client per round and final server accuracy for
top-k in {all, 16, 4} x dtype in {fp32, fp16, int8}, plus the payload of classification vs
generation under kd and fedavg. Writes benchmarks/kd_compression.md (rewritten after every run,
so an interrupted benchmark keeps what it measured).

    python benchmarks/kd_compression.py                 # tiny GPT-2, 20 intents (~10 min on an idle 2-core machine)
    python benchmarks/kd_compression.py --payload-only  # the classify/generate payload table only

Payload sizes depend only on tensor shapes, so the classify-vs-generate table serializes
messages of the exact shapes a round sends (the same bytes a run meters) without training."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedtune import config as configlib  # noqa: E402
from fedtune import data as datalib  # noqa: E402
from fedtune import models, tasks  # noqa: E402
from fedtune.frameworks.kd import encode_outputs  # noqa: E402
from fedtune.wire import Message, serialize  # noqa: E402
from fedtune.rundir import RunDir  # noqa: E402
from fedtune.runtimes import run  # noqa: E402

OUT = Path(__file__).with_suffix(".md")
SETTING = {
    "model.name": "tiny-gpt2", "data.max_labels": 20, "data.private_size": 600, "data.public_size": 200,
    "data.test_size": 300, "fed.clients": 3, "fed.rounds": 3, "train.local_epochs": 2,
    "kd.client_eval_size": 0, "train.threads": 1,
}
MB = 1e6


def run_one(overrides: dict, out: Path) -> dict:
    cfg = configlib.build_config("demo", None, {**SETTING, **overrides, "out": str(out)})
    start = time.perf_counter()
    summary = run(cfg, RunDir.create(cfg))
    recs = [r for r in RunDir(out).metrics.records() if r["client"] != "server"]
    mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
    later = [r for r in recs if r["round"] > 1]  # round 1 has no down message under kd
    return {
        "acc": summary["final_test_accuracy"], "up": mean("bytes_up") / MB,
        "down": sum(r["bytes_down"] for r in later) / max(len(later), 1) / MB,
        "gflops": mean("client_flops") / 1e9, "wall": time.perf_counter() - start,
    }


def payload_rows(model_name: str, public_size: int, max_labels: int) -> list[dict]:
    """Bytes per client per round (up) of fedavg and kd, classify vs generate, by shape."""
    out = []
    dcfg = configlib.DataConfig(public_size=public_size, private_size=0, max_labels=max_labels, test_size=0)
    fed = datalib.load(dcfg, 3, 0)
    for task in ("classify", "generate"):
        mcfg = configlib.ModelConfig(name=model_name)
        model, tok = models.build(mcfg, fed.num_labels, 0, task)
        t = tasks.make(task, tok, fed.label_names, dcfg.max_length)
        rows = sum(t.rows_per_example(fed.public.labels))
        width = fed.num_labels if task == "classify" else model.get_base_model().get_output_embeddings().out_features
        fedavg = len(serialize(Message(models.get_tunable(model))))
        for k, dtype in [(0, "fp32"), (16, "fp32"), (16, "int8"), (4, "int8")]:
            kd = configlib.KDConfig(logit_topk=k, logit_dtype=dtype)
            size = len(serialize(Message(encode_outputs(torch.zeros(rows, width), kd))))
            out.append(dict(model=model_name, task=task, rows=rows, width=width, fedavg=fedavg / MB,
                            k="all" if not k else k, dtype=dtype, kd=size / MB))
        del model
    return out


def write(compression: list[dict], payload: list[dict], cmd: str) -> None:
    lines = ["# KD-FedLLM logit compression", "", f"Command: `{cmd}`", ""]
    if compression:
        s = SETTING
        lines += [
            f"Setting: {s['model.name']}, {s['data.max_labels']} most frequent Banking77 intents, "
            f"{s['fed.clients']} clients x {s['data.private_size'] // s['fed.clients']} private rows, "
            f"{s['data.public_size']} public rows, {s['fed.rounds']} rounds, {s['train.local_epochs']} local "
            f"epochs, test {s['data.test_size']} rows, seed 0. Up = client -> server; down = server -> client "
            "(rounds 2+; round 1 sends nothing). Accuracy is the server (global) model's.", "",
            "| top-k | dtype | MB up / client / round | MB down / client / round | final server accuracy | client GFLOPs / round | wall s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in compression:
            lines.append(f"| {r['k']} | {r['dtype']} | {r['up']:.4f} | {r['down']:.4f} | {r['acc']:.1%} | "
                         f"{r['gflops']:.2f} | {r['wall']:.0f} |")
        lines.append("")
    if payload:
        lines += [
            "## Classification vs generation: MB per client per round (upload)", "",
            "fedavg uploads the tunable state (LoRA + head under classify, LoRA under generate); kd uploads "
            "one row per public example (classify) or per answer token (generate, width = vocabulary). "
            "Sizes are serialized messages of the shapes a round sends.", "",
            "| model | task | public rows | width | fedavg MB | kd top-k | kd dtype | kd MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in payload:
            lines.append(f"| {r['model']} | {r['task']} | {r['rows']} | {r['width']} | {r['fedavg']:.3f} | "
                         f"{r['k']} | {r['dtype']} | {r['kd']:.3f} |")
        lines.append("")
    OUT.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--payload-only", action="store_true")
    p.add_argument("--out", default="/tmp/fedtune-kd-bench")
    p.add_argument("--models", default="tiny-gpt2,smollm2", help="models for the payload table")
    args = p.parse_args()
    cmd = "python " + " ".join(sys.argv)
    payload: list[dict] = []
    for name in args.models.split(","):
        payload += payload_rows(name, 500, 0)  # the demo preset: 500 public rows, 77 intents
        write([], payload, cmd)
    compression: list[dict] = []
    if not args.payload_only:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in (0, 16, 4):
            for dtype in ("fp32", "fp16", "int8"):
                res = run_one({"framework": "kd", "kd.logit_topk": k, "kd.logit_dtype": dtype},
                              Path(args.out) / f"{stamp}-k{k}-{dtype}")
                compression.append({"k": "all" if not k else k, "dtype": dtype, **res})
                print(compression[-1], flush=True)
                write(compression, payload, cmd)
        res = run_one({"framework": "fedavg"}, Path(args.out) / f"{stamp}-fedavg")
        compression.append({"k": "fedavg (reference)", "dtype": "fp32", **res})
        write(compression, payload, cmd)


if __name__ == "__main__":
    main()
