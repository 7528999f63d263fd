"""Instruction tuning on a person's own prompt/response file, on defaults, through the CLI: the
sizes follow the file, --data picks the task, generation stays within a short-context model's
positions, every place names the task's metric, and data.system_prompt is used everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune import cli, models
from fedtune import config as configlib
from fedtune.rundir import sft_use
from fedtune.sft_data import SftRows
from fedtune.tasks import TASKS
from fedtune.config import ModelConfig
from fedtune.tasks.sft import SftTask, chat_template_with_system, fit_context, format_prompt

FAST = ["--model", "tiny-gpt2", "--clients", "2", "--rounds", "1", "--set", "train.threads=1"]


@pytest.fixture
def support(tmp_path) -> Path:
    rows = [{"prompt": f"How do I reset the password of account {i}?", "response": f"Open settings, then reset {i}."}
            for i in range(50)]
    path = tmp_path / "support.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sizes(overrides: dict) -> tuple[int, int, int]:
    cfg = configlib.build_config("demo", None, overrides)
    TASKS.load(cfg.train.task).load_data(cfg)
    return cfg.data.test_size, cfg.data.public_size, cfg.data.private_size


def test_sizes_follow_the_data(support):
    own = {"train.task": "sft", "data.path": str(support), "fed.clients": 2}
    assert sizes(own) == (5, 0, 45)  # fedavg reads no public rows
    assert sizes({**own, "framework": "split"}) == (5, 0, 45)
    assert sizes({**own, "framework": "kd"}) == (5, 22, 23)  # kd distils on public rows
    assert sizes({**own, "data.test_size": 10}) == (10, 0, 40)  # an explicit size is kept, the rest fill in
    assert sizes({}) == (400, 500, 900)  # Banking77 on defaults: the demo split


def test_explicit_size_that_does_not_fit_is_one_line(support, tmp_path, capsys):
    for key, value in (("data.test_size", 60), ("data.public_size", 50)):
        out = tmp_path / key
        assert cli.main(["run", "--data", str(support), *FAST, "--out", str(out), "--set", f"{key}={value}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"fedtune: error: {key} ({value}) leaves no")
        assert not out.exists()


def test_short_context_is_checked_before_the_run(support, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--data", str(support), *FAST, "--out", str(out), "--set", "data.max_length=200"]) == 2
    assert "data.max_length (200) exceeds the 128 positions of tiny-gpt2" in capsys.readouterr().err
    assert not out.exists()
    assert fit_context(79, 256, 128) == (64, 64)  # a long prompt loses its start, the answer keeps half
    assert fit_context(20, 256, 128) == (20, 108)  # a short one keeps all of it
    assert fit_context(20, 30, 128) == (20, 30)


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer(ModelConfig(name="tiny-gpt2"))


@pytest.mark.parametrize("system", ["", "You answer support questions in one sentence."])
def test_system_prompt(tok, system):
    cfg = configlib.build_config("demo", None, {"train.task": "sft", "data.system_prompt": system})
    task = SftTask(tok, [], 80)
    task.run_cfg = cfg
    rows = SftRows(["q"], [], [[{"role": "user", "content": "Where is my card?"}]], ["On its way."])
    text = tok.decode(task.encode(rows)[0])
    turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""  # none by default, not SmolLM2's own
    assert "SmolLM" not in text
    assert text == f"{turn}<|im_start|>user\nWhere is my card?<|im_end|>\n<|im_start|>assistant\nOn its way.<|im_end|>"
    # fedtune export writes a chat template that prompts the same way
    exported = models.load_tokenizer(ModelConfig(name="tiny-gpt2"))
    exported.chat_template = chat_template_with_system(tok, system)
    turns = rows.turns[0]
    assert exported.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == \
        tok.decode(format_prompt(tok, turns, system))


def test_sft_use_text_describes_the_sft_prompt():
    assert "Intent" not in sft_use("") and "apply_chat_template" in sft_use("") and "no system turn" in sft_use("")
    assert '"Be brief."' in sft_use("Be brief.")


def test_own_file_on_defaults_then_generate_and_export(support, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["run", "--data", str(support), *FAST, "--out", str(run)]) == 0
    captured = capsys.readouterr()
    err, out = captured.err, captured.out
    assert "train.task = sft" in err  # picked from the file, said once
    assert "data: 5 test, 0 public, 45 private rows" in err
    assert err.count("tiny-gpt2 has 128 positions") == 1  # eval.max_new_tokens=256 is capped, said once
    assert "test rougeL" in err and "test acc" not in err
    assert "rougeL" in out and "final test rougeL" in out and "accuracy" not in out
    saved = (run / "config.toml").read_text()
    assert "test_size = 5" in saved and "public_size = 0" in saved and "private_size = 45" in saved
    assert "| final test rougeL |" in (run / "adapter/README.md").read_text()
    assert json.loads((run / "summary.json").read_text())["test_metric"] == "rougeL"

    assert cli.main(["generate", str(run), "How do I reset my password?", "--max-new-tokens", "300"]) == 0
    assert "tiny-gpt2 has 128 positions" in capsys.readouterr().err

    merged = tmp_path / "merged"
    assert cli.main(["export", str(run), "--merged", str(merged)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoTokenizer.from_pretrained(merged)
    turns = [{"role": "user", "content": "Where is my card?"}]
    assert exported.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>user\nWhere is my card?<|im_end|>\n<|im_start|>assistant\n"  # no system turn, as trained
    assert AutoModelForCausalLM.from_pretrained(merged).config.n_positions == 128


@pytest.mark.parametrize("framework", ["kd", "split"])
def test_own_file_under_kd_and_split(support, tmp_path, capsys, framework):
    run = tmp_path / framework
    assert cli.main(["run", "--data", str(support), *FAST, "--out", str(run), "--framework", framework,
                     "--quiet"]) == 0
    assert "final test rougeL" in capsys.readouterr().out
    assert (run / "adapter/adapter_model.safetensors").is_file()
