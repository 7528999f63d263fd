"""The ``fedtune`` command line: its subcommands, flags and help (``cli.py`` runs them)."""

from __future__ import annotations

import argparse
import textwrap

from . import __version__
from .frameworks import FRAMEWORKS
from .runtimes import RUNTIMES
from .tasks import TASKS

# Flags for the common knobs; everything else is --set section.key=value.
FLAGS = {
    "framework": "framework", "model": "model.name", "data": "data.path", "clients": "fed.clients",
    "rounds": "fed.rounds", "seed": "seed", "out": "out", "runtime": "runtime", "task": "train.task",
}


FRAMEWORK_HELP = {
    "fedavg": "clients train LoRA locally, the server averages it",
    "kd": "clients send their outputs on a public set, the server distils them",
    "split": "the model is cut in two, clients run the first part",
    "zo": "zeroth-order steps sent as seeds and scalars",
}
RUN_EPILOG = """\
examples:
  fedtune run --framework fedavg                                # the demo: SmolLM2 on Banking77
  fedtune run --data my_data/ --model minilm --rounds 5 --clients 4
  fedtune run --task sft --data chats.jsonl --set eval.max_new_tokens=64
  fedtune run --resume runs/fedavg-20261121-101500 --set fed.rounds=6   # continue, then go on longer

every other setting is --set SECTION.KEY=VALUE: `fedtune config --list` lists each key with its
default and what it does (docs/run-directory.md: what a run leaves behind)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    # Names like tiny-gpt2 and flower-sim stay whole: argparse would break lines at their hyphens.
    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _run_parser(sub) -> None:
    r = sub.add_parser(
        "run", help="run one federated fine-tuning job", epilog=RUN_EPILOG,
        formatter_class=_HelpFormatter,
        description="Fine-tune a model with LoRA over simulated clients that each keep their own rows, and write\n"
                    "the run directory: config.toml, metrics.jsonl, summary.json, environment.json, checkpoint.pt\n"
                    "and the final adapter.")
    r.add_argument("--framework", choices=FRAMEWORKS.names, help="how clients and server cooperate (default fedavg): "
                   + "; ".join(f"{n} ({FRAMEWORKS.title(n)}) {FRAMEWORK_HELP.get(n, '')}".rstrip() for n in FRAMEWORKS.names))
    r.add_argument("--model", help="smollm2 (embedded, default), minilm (embedded), tiny-gpt2, tiny-llama or tiny-bert "
                                   "(random, for tests), a Hugging Face id, a local model directory or a .gguf file")
    r.add_argument("--data", help="a directory with train.csv and test.csv (text,category), or a JSONL, JSON or "
                                  "parquet file of prompt/response rows (--task sft); default: Banking77")
    r.add_argument("--clients", type=int, help="simulated clients the training rows are split over (default 3)")
    r.add_argument("--rounds", type=int, help="federated rounds (default 3)")
    r.add_argument("--seed", type=int, help="seeds the data split, the initial weights and the sampling (default 0)")
    r.add_argument("--out", help="run directory (default runs/<framework>-<time>)")
    r.add_argument("--runtime", choices=RUNTIMES.names,
                   help="where clients run: inprocess (default, one process), flower-sim or flower (Flower)")
    r.add_argument("--task", choices=TASKS.names, help="what the model learns (default classify): "
                   + ", ".join(f"{n} ({TASKS.title(n)})" for n in TASKS.names))
    r.add_argument("--preset", default="demo", help="demo (default, ~10 min on 2 cores) or paper (the case study)")
    r.add_argument("--config", help="TOML or YAML file with config sections")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable; `fedtune config --list` lists them)")
    r.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint; --set may change eval.*, "
                        "train.threads and fed.rounds (to run longer), nothing else")
    r.add_argument("--quiet", action="store_true", help="no progress bar or table")
    r.add_argument("--log-every", type=float, default=0.0, metavar="SECONDS",
                   help="without a terminal (a log), also report the current client's steps at most every SECONDS; "
                        "default 0: one line per client and per round")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of LLMs with LoRA.")
    p.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    s = sub.add_parser("sweep", help="run a grid of configs x seeds from an experiment file, then report")
    s.add_argument("experiment", help="experiment TOML file (see docs/sweeps.md)")
    s.add_argument("--out", help="sweep directory (default: the file's [sweep] out, else runs/sweep-<file stem>)")
    s.add_argument("--dry-run", action="store_true", help="list the points and exit")
    s.add_argument("--fail-fast", action="store_true", help="stop at the first failing point")
    s.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--grid", action="append", default=[], metavar="NAME",
                   help="run only this grid's points (repeatable): sweeps of different grids may run side by side")
    s.add_argument("--seed", action="append", default=[], type=int, metavar="N",
                   help="run only this seed's points (repeatable): another seed can be added to a finished sweep")
    rp = sub.add_parser("report", help="aggregate a sweep directory over seeds into figures and report.md")
    rp.add_argument("sweep_dir", help="directory holding run directories (searched recursively)")
    rp.add_argument("--out", help="where to write report.md and the figures (default: SWEEP_DIR)")
    rp.add_argument("--baseline", default="", metavar="NAME",
                    help="the entry paired differences are taken against (default: the experiment's, else fedavg)")
    g = sub.add_parser("generate", help="answer prompts with a finished run's model, streaming tokens")
    g.add_argument("run_dir", help="a finished run directory (sft or generate task)")
    g.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    g.add_argument("--file", help="JSONL of prompts: a string, or an object with prompt/question/instruction/messages")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--client", type=int, metavar="K", help="answer with client K's personal model (adapters/client-K)")
    from .lm_evaluation import add_parser as add_eval

    add_eval(sub)
    e = sub.add_parser("export", help="write a run's model as a standalone Hugging Face model directory")
    e.add_argument("run_dir", help="a finished run directory")
    e.add_argument("--merged", required=True, metavar="OUT", help="directory for the model with the adapter merged in")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="the dtype of the written weights (default fp32; the merge itself runs in fp32)")
    e.add_argument("--client", type=int, metavar="K", help="export client K's personal model (adapters/client-K)")
    a = sub.add_parser("audit", help="a run's privacy audit: the accountant's epsilon beside a measured lower bound")
    a.add_argument("run_dir", help="a finished run directory (with privacy.audit = true for the canary bound)")
    c = sub.add_parser("config", help="list every config key (for --set and config files) with its default")
    c.add_argument("--list", action="store_true", help="every key, its default and one line of help (the default)")
    return p
