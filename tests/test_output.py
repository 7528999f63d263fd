"""What a user sees: plain progress lines in a log, end-of-run tables that never cut a number,
the adapter snippet that runs as printed, and SIGTERM handled like Ctrl-C."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fedtune.cli import main
from fedtune.console import plain_table, print_table
from fedtune.metrics import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny-gpt2", "--set", "data.private_size=40", "--set", "data.test_size=40",
         "--set", "data.public_size=0", "--set", "data.max_labels=4", "--set", "train.threads=1"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_log_lines_per_client_round_and_per_round_without_a_terminal(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--clients", "2", "--rounds", "2", "--log-every", "1e-9", *SMALL]) == 0
    err = capsys.readouterr().err.splitlines()  # captured: not a terminal
    assert err[0] == f"fedtune fedavg on tiny-gpt2: 2 clients, 2 rounds -> {out}"
    records = MetricsLog(out / "metrics.jsonl").records()
    clients = [line for line in err if re.match(r"round \d/2 client \d \(\d/2\), ", line)]
    rounds = [line for line in err if re.match(r"round \d/2 done, ", line)]
    assert len(clients) == 4 and len(rounds) == 2
    for line, rec in zip(clients, [r for r in records if r["client"] != "server"]):
        assert line.startswith(f"round {rec['round']}/2 client {rec['client']} ")
        assert re.search(r", [\d.]+ samples/s, loss " + f"{rec['train_loss']:.3f}, " +
                         f"{rec['bytes_up'] / 1e6:.2f} MB up, {rec['bytes_down'] / 1e6:.2f} MB down, " +
                         r"elapsed \d+:\d\d, ETA \d+:\d\d$", line), line
    for line, rec in zip(rounds, [r for r in records if r["client"] == "server"]):
        assert line.startswith(f"round {rec['round']}/2 done, test acc {rec['test_accuracy']:.2%}, ")
        assert re.search(r"elapsed \d+:\d\d, ETA \d+:\d\d$", line)
    assert rounds[-1].endswith("ETA 0:00")
    assert any(re.match(r"round 1/2 client 0 \(1/2\): step 1/\d+, elapsed", line) for line in err)  # --log-every


def test_one_round_one_client_reads_singular(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "run"), "--clients", "1", "--rounds", "1", "--quiet", *SMALL]) == 0
    assert ": 1 client, 1 round -> " in capsys.readouterr().err


BIG = [  # a long run's numbers: 24.21%, 4832.1 GFLOPs, 1006.3 s rounds
    {"round": 100, "client": 0, "bytes_up": 12_345_678, "bytes_down": 12_345_678, "client_flops": 4.8321e12,
     "client_seconds": 1006.3, "client_peak_mem_bytes": 12_345_678_901, "train_loss": 12.3456},
    {"round": 100, "client": "server", "test_accuracy": 0.242137, "test_loss": 10.1234, "round_seconds": 1006.3},
]
BIG_CELLS = ["100", "24.21%", "10.123", "12.346", "12.346", "4832.1", "1006.3", "12346"]


@pytest.mark.parametrize("terminal", [False, True])
def test_end_of_run_table_never_cuts_numbers_at_80_columns(terminal):
    buf = StringIO()
    print_table(BIG, "fedtune fedavg (runs/fedavg-20261122-213000)", Console(file=buf, width=80, force_terminal=terminal))
    text = buf.getvalue()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    for cell in BIG_CELLS:
        assert re.search(rf"(?<![\d.]){re.escape(cell)}(?![\d.])", text), (cell, text)


def test_the_table_of_a_run_in_a_log_has_every_number(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--clients", "2", "--rounds", "2", *SMALL]) == 0
    stdout = capsys.readouterr().out
    assert plain_table(MetricsLog(out / "metrics.jsonl").records(), f"fedtune fedavg ({out})") in stdout
    assert "…" not in stdout


@pytest.mark.slow
def test_the_documented_adapter_snippet_runs_and_gives_the_runs_accuracy(tmp_path, capfd):
    """docs/run-directory.md's snippet, run as printed in a fresh process beside a tiny run on a
    model directory, then the test rows through the model it loaded: the run's accuracy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedtune import models
    from fedtune.rundir import adapter_snippet

    doc = (ROOT / "docs" / "run-directory.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert snippet == adapter_snippet()
    tok = models.load_tokenizer(models.ModelConfig(name="tiny-gpt2"))
    base_dir = tmp_path / "tiny-base"
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=len(tok),
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    out = tmp_path / "runs" / "tiny"
    capfd.readouterr()
    assert main(["run", "--out", str(out), "--clients", "2", "--rounds", "2", "--quiet", *SMALL,
                 "--model", str(base_dir)]) == 0
    # Loading a model directory is quiet: no deprecation warnings, no loading bars.
    assert capfd.readouterr().err.splitlines() == [f"fedtune fedavg on {base_dir}: 2 clients, 2 rounds -> {out}"]
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base_dir.resolve())
    readme = (out / "adapter" / "README.md").read_text()
    assert adapter_snippet(str((out / "adapter").resolve())) in readme  # its own path, runnable as printed
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['final_test_accuracy']:.2%}" in readme and "fedavg" in readme
    evaluate = """
from fedtune import config as configlib, data as datalib
cfg = configlib.build_config(file="runs/tiny/config.toml")
fed = datalib.load(cfg.data, cfg.fed.clients, cfg.seed)
assert labels == fed.label_names
correct = 0
for i in range(0, len(fed.test), 16):
    enc = tok(fed.test.texts[i:i + 16], return_tensors="pt", padding=True, truncation=True, max_length=cfg.data.max_length)
    with torch.no_grad():
        correct += (model(**enc).logits.argmax(-1) == torch.tensor(fed.test.labels[i:i + 16])).sum().item()
print("ACCURACY", correct / len(fed.test))
"""
    proc = subprocess.run([sys.executable, "-c", snippet + evaluate], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, last = proc.stdout.strip().splitlines()[0], proc.stdout.strip().splitlines()[-1]
    assert first in json.loads((out / "adapter" / "labels.json").read_text())  # the snippet's own prediction
    assert float(last.split()[1]) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_sigterm_stops_a_run_like_ctrl_c_and_it_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedtune", "run", "--out", str(out), "--clients", "1", "--rounds", "12", "--quiet",
           *SMALL, "--set", "data.private_size=16", "--set", "data.test_size=8"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    done = torch.load(out / "checkpoint.pt", weights_only=False)["round"]  # intact
    assert 1 <= done < 12 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"fedtune: stopped after round {done}; resume with --resume {out}"
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert f"fedtune fedavg on tiny-gpt2: resuming {out} from round {done + 1} of 12" in capsys.readouterr().err
    records = MetricsLog(out / "metrics.jsonl").records()
    assert [r["round"] for r in records if r["client"] == "server"] == list(range(1, 13))
    assert [r["round"] for r in records if r["client"] != "server"] == list(range(1, 13))


@pytest.mark.slow
def test_preparing_the_embedded_smollm2_is_one_line(tmp_path):
    """First use dequantizes the embedded GGUF: one line says so, no bars or warnings. (A split
    layer smollm2 cannot take then stops the run before its weights load.)"""
    env = {**_env(), "FEDTUNE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fedtune", "run", "--framework", "split", "--model", "smollm2", "--out",
           str(tmp_path / "run"), "--set", "split.split_layer=30"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    cache = tmp_path / "cache" / "smollm2-135m-instruct"
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"fedtune: preparing the embedded SmolLM2 (540 MB) once (~20 s), cached in {cache}",
        "fedtune: error: split.split_layer=30: smollm2 has 30 transformer blocks, so the client can keep 1..29 "
        "of them (0 = auto: 2, or L-1 for shallower models)",
    ]
    assert (cache / "config.json").is_file() and not (tmp_path / "run").exists()


def test_warnings_read_like_fedtune_lines_even_after_a_dependency_sets_root_logging(capsys):
    import logging

    from fedtune.cli import _own_log_lines

    _own_log_lines()
    logging.basicConfig(format="%(asctime)s:%(levelname)s:%(message)s")  # what Opacus does at import
    logging.getLogger("fedtune.tasks.sft").warning("data.max_length=8 truncated 1 prompts")
    assert capsys.readouterr().err == "fedtune: data.max_length=8 truncated 1 prompts\n"
