"""A first run on one's own data: `fedtune run --help` and `fedtune config --list` say what to
type, --resume takes the settings that may change, the run directory records what its numbers
depend on, the run says what it does from its first second, and the same job gives the same
numbers twice, even beside a busy process."""

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedtune import config as configlib
from fedtune.cli import main
from fedtune.config_help import key_help
from fedtune.console import LogProgress
from fedtune.frameworks import FRAMEWORKS
from fedtune.metrics import MetricsLog

SMALL = ["--model", "tiny-gpt2", "--clients", "2", "--set", "data.private_size=60", "--set", "data.test_size=40",
         "--set", "data.public_size=0", "--set", "data.max_labels=4", "--set", "train.threads=1"]


def test_config_list_gives_every_key_its_default_and_help(capsys):
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rounds = [line for line in lines if line.startswith("fed.rounds ")]
    assert len(rounds) == 1 and re.match(r"fed\.rounds = 3 +\S", rounds[0]), rounds
    assert [line.split(" = ")[0] for line in lines] == configlib.known_keys()
    assert all(help for _, _, help in key_help())  # every key is explained


@dataclass
class _Section:
    """A section defined outside config.py."""

    alpha: int = 1  # the comment beside it
    # the comment above it
    beta: list[int] = field(default_factory=lambda: [2])
    gamma: str = "x"


@dataclass
class _Config:
    name: str = "n"  # a top-level key
    extra: _Section = field(default_factory=_Section)


def test_key_help_reads_each_sections_own_source_wherever_it_lives():
    assert key_help(_Config) == [
        ("name", '"n"', "a top-level key"),
        ("extra.alpha", "1", "the comment beside it"),
        ("extra.beta", "[2]", "the comment above it"),
        ("extra.gamma", '"x"', "A section defined outside config.py."),  # no comment: the section's docstring
    ]


def test_run_help_stands_alone(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["run", "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--framework", "--model", "--data", "--clients", "--rounds", "--seed", "--runtime", "--task",
                 "--resume RUN_DIR", "--set KEY=VALUE"):
        assert re.search(re.escape(flag) + r"\b.*? [a-z(]", text), flag
    for word in ("train.csv", "test.csv", "JSONL", "JSON", "parquet", "prompt/response", "smollm2", "minilm",
                 "tiny-gpt2", "tiny-llama", "tiny-bert", "Hugging Face id", ".gguf", "fedtune config --list",
                 "examples:", *FRAMEWORKS.names):
        assert word in text, word
    assert text.count("fedtune run ") >= 3  # the examples


def test_resume_applies_and_records_the_keys_that_may_change_and_refuses_the_rest(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--rounds", "1", "--quiet", *SMALL]) == 0
    capsys.readouterr()
    saved = (out / "config.toml").read_text()
    for args, named in ((["--set", "model.lora_r=4"], "model.lora_r"), (["--seed", "7"], "seed"),
                        (["--set", "eval.max_new_tokens=16", "--set", "train.lr=1"], "train.lr"),
                        (["--out", str(tmp_path / "elsewhere")], "out")):
        assert main(["run", "--resume", str(out), "--quiet", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"fedtune: error: --resume cannot change {named}"), err
        assert (out / "config.toml").read_text() == saved  # nothing changed
    assert main(["run", "--resume", str(out), "--quiet", "--out", str(out), "--set", "eval.max_new_tokens=16",
                 "--rounds", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming with fed.rounds=2 (was 1), eval.max_new_tokens=16 (was 256)" in err
    assert f"resuming {out} from round 2 of 2" in err
    cfg = configlib.build_config(file=out / "config.toml")
    assert (cfg.eval.max_new_tokens, cfg.fed.rounds, cfg.model.name) == (16, 2, "tiny-gpt2")
    assert [r["round"] for r in MetricsLog(out / "metrics.jsonl").records() if r["client"] == "server"] == [1, 2]
    env = json.loads((out / "environment.json").read_text())
    assert [r["from_round"] for r in env["resumes"]] == [2]
    assert main(["run", "--resume", str(out), "--quiet", "--rounds", "1"]) == 2  # fewer rounds than done
    err = capsys.readouterr().err.strip()
    assert err == f"fedtune: error: fed.rounds=1: {out} has done 2 rounds already"


def test_the_run_directory_records_what_its_numbers_depend_on(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--rounds", "1", "--quiet", *SMALL]) == 0
    env = json.loads((out / "environment.json").read_text())
    for package in ("torch", "transformers", "peft", "numpy"):
        assert env["packages"][package]
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(env["cpu"]["flags"]) == {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2", "fma"}
    assert env["cpu"]["torch_capability"] and env["threads"]["torch"] == 1
    assert env["model"] == {"name": "tiny-gpt2", "source": "tiny-gpt2", "weights_sha256": None}  # random init


def test_progress_speaks_before_the_first_client_ends_with_an_eta_from_the_first_step():
    lines = []
    p = LogProgress(2, write=lines.append)
    p.phase("loading tiny-gpt2, reading and tokenizing the data")
    p.start(3, 1)
    p.client(1, 0, 1, 2)
    p.step(1, 10)
    assert len(lines) == 2  # the first step carries warm-up: the second is timed
    p.step(2, 10)
    p.step(3, 10)
    assert lines[0] == "loading tiny-gpt2, reading and tokenizing the data"
    assert re.fullmatch(r"ready after \d+:\d\d; training from round 1 of 3", lines[1])
    assert re.fullmatch(r"round 1/3 client 0 \(1/2\): [\d.]+ s per step \(the first took [\d.]+ s\), 10 steps per "
                        r"client; ETA \d+:\d\d for training", lines[2])
    assert len(lines) == 3  # once per run


def _metrics(out):
    # Everything but what the clock and the allocator measure.
    return [{k: v for k, v in r.items() if not re.search("seconds|mem", k)} for r in MetricsLog(out / "metrics.jsonl").records()]


@pytest.mark.slow
def test_the_same_job_gives_the_same_numbers_twice_even_beside_a_busy_process(tmp_path, capsys):
    args = ["--rounds", "2", *SMALL, "--set", "train.threads=2"]
    assert main(["run", "--out", str(tmp_path / "a"), *args]) == 0
    err = capsys.readouterr().err.splitlines()
    first_client = next(i for i, line in enumerate(err) if re.match(r"round 1/2 client 0 \(1/2\), ", line))
    assert any(line.startswith("loading tiny-gpt2") for line in err[:first_client])
    assert any(" s per step " in line for line in err[:first_client])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert main(["run", "--out", str(tmp_path / "b"), "--quiet", *args]) == 0
    finally:
        busy.kill()
        busy.wait()
    assert main(["run", "--out", str(tmp_path / "c"), "--quiet", *args]) == 0
    a = _metrics(tmp_path / "a")
    assert len(a) == 6 and a == _metrics(tmp_path / "b") == _metrics(tmp_path / "c")


def test_a_gguf_conversion_is_made_again_when_what_made_it_changes(tmp_path, monkeypatch, capsys):
    import transformers

    from fedtune import environment, gguf_cache, models

    made = []

    class Model:
        config = SimpleNamespace()

        def save_pretrained(self, where):
            Path(where).mkdir(parents=True, exist_ok=True)
            (Path(where) / "config.json").write_text("{}")
            (Path(where) / "model.safetensors").write_bytes(f"weights {len(made)}".encode())

    def load(*args, **kwargs):
        made.append(kwargs["gguf_file"])
        return Model()

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=load))
    monkeypatch.setattr(transformers, "AutoTokenizer",
                        SimpleNamespace(from_pretrained=lambda *a, **k: SimpleNamespace(save_pretrained=lambda d: None)))
    gguf, dest = tmp_path / "m.gguf", tmp_path / "cache" / "m"
    gguf.write_bytes(b"x" * (3 << 20))

    def convert(times: int) -> None:
        assert gguf_cache.converted(gguf, dest, "m.gguf", lambda: None) == dest
        assert len(made) == times

    convert(1)
    convert(1)  # reused
    record = json.loads((dest / gguf_cache.RECORD).read_text())
    assert record["key"]["transformers"] == transformers.__version__ and record["key"]["gguf_size"] == 3 << 20
    assert record["weights_sha256"] == gguf_cache.weights_sha256(dest)
    monkeypatch.setattr(gguf_cache, "CONVERSION_FORMAT", gguf_cache.CONVERSION_FORMAT + 1)
    convert(2)
    gguf.write_bytes(b"x" * (3 << 20) + b"y")  # another file of that name
    convert(3)
    monkeypatch.setattr(gguf_cache, "_version", lambda package: "0.0.1")  # another transformers
    convert(4)
    (dest / gguf_cache.RECORD).unlink()  # a conversion made by code that kept no record
    convert(5)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"fedtune: preparing m.gguf once (~20 s), cached in {dest} (replacing one made from another file or by "
        "another version)")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]  # no temporary or stale copies left
    # A run on that model names its weights' hash in environment.json.
    monkeypatch.setattr(models, "resolve", lambda name: ("dir", dest))
    assert environment.model_weights(str(gguf))["weights_sha256"] == gguf_cache.weights_sha256(dest)
