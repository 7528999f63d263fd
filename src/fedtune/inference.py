"""Using what a run trained: ``fedtune generate RUN_DIR "prompt"`` answers with the run's final
adapter (streaming tokens), ``fedtune export RUN_DIR --merged OUT`` writes a standalone Hugging
Face model directory with the adapter merged into the weights; ``model.init_from = RUN_DIR``
starts a new run from a finished run's adapter (``warm_start``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch

from . import models
from .errors import FedtuneError
from . import config as configlib
from .rundir import ADAPTER, CONFIG, RunDir


def trained_adapter(run_dir: str | Path, key: str = "", client: int | None = None):
    """-> (the run's config, its final adapter directory, its label names), or a one-line error
    (which names ``key``, the config key that pointed here, when there is one). ``client``: that
    client's personal adapter (adapters/client-K/, fed.personalization) instead of the global one."""
    rundir = RunDir(run_dir)
    where = f"{key}={rundir.path}" if key else str(rundir.path)
    if not (rundir.path / CONFIG).is_file():
        raise FedtuneError(f"{where}: not a run directory (no {CONFIG})")
    # Inference loads the base in full precision wherever the run trained: a GPU run with bf16
    # or a 4-bit base (QLoRA) still answers, and merges, on a CPU.
    cfg = configlib.build_config(file=rundir.path / CONFIG, overrides={"train.precision": "fp32", "model.quantize": ""})
    adapter = rundir.path / ADAPTER if client is None else rundir.path / "adapters" / f"client-{client}"
    if client is not None and not adapter.is_dir():
        raise FedtuneError(f"{where}: no personal adapter for client {client} (adapters/client-{client}: the run "
                           f"needs fed.personalization and a client id below fed.clients={cfg.fed.clients})")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FedtuneError(f"{where}: no trained adapter (the run has not finished; resume it with --resume)")
    return cfg, adapter, json.loads((adapter / "labels.json").read_text())


def load_run(run_dir: str | Path, client: int | None = None):
    """-> (config, peft model with the run's final adapter, or client ``client``'s, tokenizer, label names)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, adapter, labels = trained_adapter(run_dir, client=client)
    # The same base as the run (a tiny random model is rebuilt from the run's seed), then the adapter.
    model, tok = models.build(cfg.model, max(len(labels), 1), cfg.seed, cfg.train.task)
    set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
    model.eval()
    return cfg, model, tok, labels


def warm_start(model, cfg: configlib.RunConfig, label_names: list[str]) -> None:
    """``model.init_from``: the finished run's final tunable state (LoRA + head, as its adapter
    holds it) into ``model``, whose LoRA and head are then the global state every framework
    starts from. The two runs must agree on the base, the task, the labels and every shape."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    key = "model.init_from"
    src, adapter, labels = trained_adapter(cfg.model.init_from, key)
    where = f"{key}={cfg.model.init_from}"
    for name, theirs, mine in (("model.name", src.model.name, cfg.model.name), ("train.task", src.train.task, cfg.train.task),
                               ("model.peft", src.model.peft, cfg.model.peft)):
        if theirs != mine:
            raise FedtuneError(f"{where}: that run has {name}={theirs!r}, this one {mine!r}")
    if labels != list(label_names):
        raise FedtuneError(f"{where}: that run's {len(labels)} labels differ from this run's {len(label_names)} "
                           "(data.path, data.max_labels)")
    saved = load_file(adapter / "adapter_model.safetensors")
    here = get_peft_model_state_dict(model, save_embedding_layers=False)
    for name in sorted(saved.keys() | here.keys()):
        theirs = tuple(saved[name].shape) if name in saved else "absent"
        mine = tuple(here[name].shape) if name in here else "absent"
        if theirs != mine:
            raise FedtuneError(f"{where}: tensor {name} is {theirs} there and {mine} here "
                               "(model.lora_r and the rank keys, model.target_modules)")
    set_peft_model_state_dict(model, saved)


def read_prompts(path: str | Path) -> Iterator[list[dict]]:
    """Conversations from a JSONL file: a JSON string per line, or an object with ``prompt``,
    ``question``, ``instruction`` (+ ``input``) or ``messages`` (a trailing assistant turn is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FedtuneError(f"{path}: file not found")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FedtuneError(f"{path}: line {n}: not JSON ({exc.msg})") from None
        if isinstance(row, str):
            yield [{"role": "user", "content": row}]
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            turns = list(row["messages"])
            yield turns[:-1] if turns and turns[-1].get("role") == "assistant" else turns
        elif isinstance(row, dict) and any(row.get(k) for k in ("prompt", "question", "instruction")):
            text = next(str(row[k]) for k in ("prompt", "question", "instruction") if row.get(k))
            yield [{"role": "user", "content": text + (f"\n\n{row['input']}" if row.get("input") else "")}]
        else:
            raise FedtuneError(f"{path}: line {n}: expected a string or an object with prompt, question, instruction or messages")


def generate(run_dir: str | Path, conversations: list[list[dict]], max_new_tokens: int = 256, stream=True,
             client: int | None = None) -> list[str]:
    """Greedy answers of the run's model, streamed to stdout as they are written."""
    from transformers import TextStreamer

    from .tasks.generate import GenerateTask
    from .tasks.sft import context_note, context_size, fit_context, format_prompt, say_once

    cfg, model, tok, _ = load_run(run_dir, client)
    if cfg.train.task == "classify":
        raise FedtuneError(f"{run_dir}: a classify run predicts labels, it does not generate; use fedtune export")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    answers = []
    for i, turns in enumerate(conversations):
        if stream and len(conversations) > 1:
            print(f"{'' if i == 0 else chr(10)}### {i + 1}: {turns[-1]['content']}", flush=True)
        if cfg.train.task == "sft":
            ids = format_prompt(tok, turns, cfg.data.system_prompt)
        else:  # generate: the intent-name prompt the run was trained on
            ids = tok(GenerateTask.PROMPT.format(text=turns[-1]["content"]))["input_ids"]
        keep, new = fit_context(len(ids), max_new_tokens, context_size(model.config))
        if new != max_new_tokens or keep < len(ids):  # never more positions than the model has
            say_once(context_note(cfg.model.name, context_size(model.config), max_new_tokens, "--max-new-tokens"))
        ids = ids[len(ids) - keep :]
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=new,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 streamer=streamer)
        answers.append(tok.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return answers


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(run_dir: str | Path, out: str | Path, dtype: str = "fp32", client: int | None = None) -> Path:
    """A standalone model directory: ``AutoModelForCausalLM`` (sft, generate) or
    ``AutoModelForSequenceClassification`` (classify, with the label names) loads it. The adapter
    is merged in fp32 (whatever train.precision the run trained in), then the whole model is
    written in ``dtype`` (fp32, bf16 or fp16)."""
    if dtype not in EXPORT_DTYPES:
        raise FedtuneError(f"--dtype {dtype}: choose from {', '.join(EXPORT_DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedtuneError(f"{out}: already exists and is not empty")
    cfg, model, tok, labels = load_run(run_dir, client)
    merged = models.merged_model(model).to(EXPORT_DTYPES[dtype])
    if cfg.train.task == "classify":
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {n: i for i, n in enumerate(labels)}
    if cfg.train.task == "sft" and getattr(tok, "chat_template", None):
        from .tasks.sft import chat_template_with_system

        # The exported template prompts as training did: data.system_prompt, or no system turn.
        template = chat_template_with_system(tok, cfg.data.system_prompt)
        if template is None:
            logging.getLogger(__name__).warning("the exported chat template keeps its own default system prompt: "
                                                "fedtune cannot take it out of this template")
        else:
            tok.chat_template = template
    tmp = out.with_name(out.name + ".tmp")  # written whole, then renamed: nothing half-written
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else (out.rmdir(), tmp.rename(out))
    return out
