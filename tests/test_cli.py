"""The command line: a tiny end-to-end run, and bad input as one clear line, no traceback."""

import json

import pytest

from fedtune.cli import main

TINY_ARGS = ["--model", "tiny-gpt2", "--rounds", "1", "--quiet", "--set", "data.private_size=60",
             "--set", "data.test_size=40", "--set", "data.public_size=0", "--set", "data.max_labels=4"]


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
    (d / "train.csv").write_text(train)
    (d / "test.csv").write_text(test)
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
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, make_args, message):
    args = ["run", "--out", str(tmp_path / "out"), "--quiet", "--set", "data.public_size=0",
            "--set", "data.private_size=0", "--set", "data.test_size=0", *make_args(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked before anything is written
