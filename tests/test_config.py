import pytest

from fedtune import config as configlib
from fedtune.errors import FedtuneError


def test_defaults_toml_and_overrides_layer_in_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('framework = "kd"\n[fed]\nrounds = 7\nclients = 5\n[model]\ntarget_modules = ["q_proj"]\n')
    cfg = configlib.build_config("demo", f, {"fed.rounds": "9", "train.lr": "2e-4", "seeds": "0,1,42"})
    assert cfg.framework == "kd" and cfg.fed.clients == 5
    assert cfg.fed.rounds == 9  # --set wins over the file
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.model.target_modules == ["q_proj"]
    assert cfg.seeds == [0, 1, 42]


def test_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("fed:\n  rounds: 4\ndata:\n  partition: dirichlet\n")
    cfg = configlib.build_config(file=f)
    assert cfg.fed.rounds == 4 and cfg.data.partition == "dirichlet"


def test_paper_preset_matches_case_study():
    cfg = configlib.build_config("paper")
    assert (cfg.data.public_size, cfg.data.private_size, cfg.fed.clients) == (5002, 5001, 3)
    assert (cfg.model.lora_alpha, cfg.model.lora_dropout, cfg.model.lora_init) == (32, 0.1, "gaussian")
    assert (cfg.train.optimizer, cfg.train.lr, cfg.data.max_length, cfg.fed.rounds) == ("adam", 1e-3, 80, 100)
    assert cfg.seeds == [0, 1, 42] and cfg.data.test_size == 0


def test_saved_config_round_trips(tmp_path):
    cfg = configlib.build_config("paper", overrides={"model.lora_r": "4"})
    configlib.save(cfg, tmp_path / "c.toml")
    assert configlib.build_config(file=tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fed.roundz": "3"}, "unknown config key 'fed.roundz' (did you mean fed.rounds"),
        ({"fed.rounds": "three"}, "expected int"),
        ({"framework": "fedsgd"}, "framework must be one of"),
        ({"fed.fraction": "0"}, "fed.fraction must be in (0, 1]"),
    ],
)
def test_bad_keys_and_values_are_clear_errors(overrides, message):
    with pytest.raises(FedtuneError) as err:
        configlib.build_config(overrides=overrides)
    assert message in str(err.value)
