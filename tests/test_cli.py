"""The command line: a tiny end-to-end run, and bad input as one clear line, no traceback."""

import json

import pytest

from fedtune.cli import main

TINY_ARGS = ["--model", "tiny-gpt2", "--rounds", "1", "--quiet", "--set", "data.private_size=60",
             "--set", "data.test_size=40", "--set", "data.public_size=0", "--set", "data.max_labels=4", "--set", "train.threads=1"]


def test_cli_run_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--framework", "fedavg", "--out", str(out), "--clients", "2", *TINY_ARGS]) == 0
    assert "final test accuracy" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["framework"] == "fedavg"
    assert "clients = 2" in (out / "config.toml").read_text()
    # A second run into the same directory would mix two runs: refused, the first one untouched.
    assert main(["run", "--out", str(out), *TINY_ARGS]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == summary


def _data(tmp_path, train, test):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for name, text in (("train.csv", train), ("test.csv", test)):
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(d)


GOOD = "text,category\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20))


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p: ["--data", _data(p, "text,label\nx,a\n", GOOD)], "train.csv: missing column(s) category"),
        (lambda p: ["--data", _data(p, "", GOOD)], "train.csv: file is empty"),
        (lambda p: ["--data", _data(p, GOOD, "text,category\nq,a\nr,c\n")],
         "test.csv: row 3: label 'c' never appears in training data"),
        (lambda p: ["--data", _data(p, GOOD, GOOD), "--clients", "30"], "client 20 was left with no data"),
        (lambda p: ["--model", str(p / "no-such-model")], "no-such-model: model path does not exist"),
        (lambda p: ["--set", "train.learning_rate=1"], "unknown config key 'train.learning_rate'"),
        (lambda p: ["--set", "fed.rounds=three"], "config key 'fed.rounds': expected int, got 'three'"),
        (lambda p: ["--data", _data(p, b"text,category\nok,a\ncaf\xe9,b\n", GOOD)],
         "train.csv: line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
        (lambda p: ["--data", _data(p, GOOD, GOOD) + "/train.csv"], "train.csv: is a file; --data takes the directory"),
        (lambda p: ["--data", _data(p, "text,category\n", GOOD)], "train.csv: file has a header but no rows"),
        (lambda p: ["--model", "no-such-model-xyz"],
         "no-such-model-xyz: not an embedded model (smollm2, minilm, tiny-gpt2, tiny-llama, tiny-bert), not a local "
         "path and not a model in the Hugging Face cache"),
        (lambda p: ["--framework", "split", "--model", "tiny-gpt2", "--set", "split.split_layer=2"],
         "split.split_layer=2: tiny-gpt2 has 2 transformer blocks, so the client can keep 1..1 of them "
         "(0 = auto: 2, or L-1 for shallower models)"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, make_args, message):
    args = ["run", "--out", str(tmp_path / "out"), "--quiet", "--set", "data.public_size=0",
            "--set", "data.private_size=0", "--set", "data.test_size=0", *make_args(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("fedtune: error: ")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_a_failure_once_the_model_is_built_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), *TINY_ARGS, "--set", "model.target_modules=no_such_layer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedtune: error: model.peft=lora: No modules were targeted")
    assert len(err) == 2 and not out.exists()


def test_unknown_model_fails_at_once_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import time

    from fedtune import models

    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("the model must not load"))
    start = time.perf_counter()
    assert main(["run", "--model", "no-such-model-xyz", "--out", str(tmp_path / "out"), *TINY_ARGS[2:]]) == 2
    assert time.perf_counter() - start < 20  # no hub retries (they took about a minute)
    assert "HF_HUB_OFFLINE=0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_csv_with_a_byte_order_mark_is_read(tmp_path, capsys):
    """Excel's "CSV UTF-8" starts with a byte-order mark; it must not stick to the first column."""
    bom = "\ufeff" + GOOD
    out = tmp_path / "out"
    args = ["run", "--out", str(out), "--data", _data(tmp_path, bom, bom), "--clients", "2", *TINY_ARGS[:5],
            "--set", "train.threads=1", "--set", "data.private_size=0", "--set", "data.public_size=0", "--set", "data.test_size=0"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["final_test_accuracy"] is not None
    # config.toml records the directory actually read, so that it reproduces the run.
    assert f'path = "{tmp_path / "data"}"' in (out / "config.toml").read_text()
    assert json.loads((out / "adapter" / "labels.json").read_text()) == ["a", "b"]


def test_default_data_path_is_resolved_in_config_toml(tmp_path):
    from fedtune import config as configlib
    from fedtune.data import default_data_dir

    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY_ARGS]) == 0
    assert configlib.build_config(file=out / "config.toml").data.path == str(default_data_dir())


def test_corrupt_checkpoint_under_resume_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY_ARGS]) == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"fedtune: error: {ckpt}: unreadable, truncated or corrupt (")
    assert "the state after round 1" in err and f"delete {ckpt} and run --resume {out} again" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched


def test_split_layer_default_adapts_to_the_model(tmp_path):
    """split.split_layer = 0 (the default) is 2, or L-1 for shallower models: 1 on the 2-block tiny GPT-2."""
    from fedtune import config as configlib

    assert configlib.RunConfig().split.split_layer == 0
    assert [configlib.split_layer_for(0, depth) for depth in (2, 3, 6, 30)] == [1, 2, 2, 2]
    assert configlib.split_layer_for(4, 30) == 4
    out = tmp_path / "run"
    assert main(["run", "--framework", "split", "--out", str(out), *TINY_ARGS]) == 0
    assert configlib.build_config(file=out / "config.toml").split.split_layer == 1  # as resolved


def test_version(capsys):
    from fedtune import __version__

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"fedtune {__version__}"
