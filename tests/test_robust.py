"""Robust strategies against hand computations, a scaled attacker in a small example, the
simulated attacks, and their one-line config errors."""

import json

import pytest
import torch

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.privacy import attacks
from fedtune.strategies import STRATEGIES

from conftest import run_tiny, tiny_config


def make(name, **fed):
    cfg = RunConfig()
    cfg.fed.strategy = name
    for k, v in fed.items():
        setattr(cfg.fed, k, v)
    return STRATEGIES.load(name)(cfg)


def ups(*rows):
    return [({"w": torch.tensor(r, dtype=torch.float32)}, 1.0) for r in rows]


ZERO = {"w": torch.zeros(2)}


def test_median_hand_computed_odd_and_even():
    out = make("median").aggregate(ZERO, ups([1.0, 9.0], [2.0, -1.0], [7.0, 3.0]))
    assert torch.equal(out["w"], torch.tensor([2.0, 3.0]))
    out = make("median").aggregate(ZERO, ups([1.0, 9.0], [2.0, -1.0], [7.0, 3.0], [4.0, 0.0]))
    assert torch.equal(out["w"], torch.tensor([3.0, 1.5]))  # mean of the two middle values


def test_trimmed_mean_hand_computed():
    rows = ([1.0, 5.0], [2.0, 4.0], [3.0, 3.0], [4.0, 2.0], [100.0, -50.0])
    out = make("trimmed_mean", trim_fraction=0.2).aggregate(ZERO, ups(*rows))  # drops 1 at each end
    assert torch.allclose(out["w"], torch.tensor([(2 + 3 + 4) / 3, (2 + 3 + 4) / 3]))
    out = make("trimmed_mean", trim_fraction=0.0).aggregate(ZERO, ups(*rows))
    assert torch.allclose(out["w"], torch.tensor([110 / 5, -36 / 5]))


def test_krum_and_multikrum_hand_computed():
    # 1-d points 0, 1, 3, 10, 30; f = 1 -> each scores its n - f - 2 = 2 nearest squared distances.
    rows = ([0.0], [1.0], [3.0], [10.0], [30.0])
    # scores: 0: 1+9=10, 1: 1+4=5, 3: 4+9=13, 10: 49+100=149, 30: 400+729=1129
    out = make("krum", krum_f=1).aggregate({"w": torch.zeros(1)}, ups(*rows))
    assert torch.equal(out["w"], torch.tensor([1.0]))
    # multikrum keeps the n - f = 4 best (1, 0, 3, 10) and averages them
    out = make("multikrum", krum_f=1).aggregate({"w": torch.zeros(1)}, ups(*rows))
    assert torch.allclose(out["w"], torch.tensor([14 / 4]))
    with pytest.raises(FedtuneError, match="needs >= 5 updates"):
        make("krum", krum_f=1).aggregate({"w": torch.zeros(1)}, ups(*rows[:4]))


def test_norm_bound_hand_computed():
    current = {"w": torch.tensor([1.0, 1.0])}
    # deltas (3, 4) has norm 5 -> scaled to norm 1: (0.6, 0.8); (0.3, 0) is within the bound
    out = make("norm_bound", norm_bound=1.0).aggregate(current, [({"w": torch.tensor([4.0, 5.0])}, 1.0),
                                                                 ({"w": torch.tensor([1.3, 1.0])}, 3.0)])
    expect = torch.tensor([1 + (0.6 * 1 + 0.3 * 3) / 4, 1 + 0.8 / 4])
    assert torch.allclose(out["w"], expect)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "norm_bound"])
def test_robust_strategies_ignore_a_scaled_attacker(name):
    g = torch.Generator().manual_seed(0)
    current = {"w": torch.zeros(6)}
    honest = [torch.ones(6) + 0.05 * torch.randn(6, generator=g) for _ in range(4)]
    attacker = 100.0 * honest[0]  # fed.attack = scale
    updates = [({"w": h}, 1.0) for h in honest] + [({"w": attacker}, 1.0)]
    fedavg = make("fedavg").aggregate(current, updates)["w"]
    out = make(name, trim_fraction=0.2, krum_f=1, norm_bound=3.0).aggregate(current, updates)["w"]
    assert (fedavg - 1).abs().max() > 10  # fedavg is dragged away
    honest_mean = torch.stack(honest).mean(0)
    # norm_bound lets the attacker move the mean by at most bound / n per round
    tol = 3.0 / 5 + 0.1 if name == "norm_bound" else 0.1
    assert (out - honest_mean).norm() < tol, (name, out)


def test_attacks_rewrite_the_update():
    cfg = RunConfig()
    cfg.fed.clients, cfg.fed.malicious_clients, cfg.fed.attack_scale = 3, [1], 4.0
    sent, local = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 0.0])}
    cfg.fed.attack = "sign_flip"
    assert torch.equal(attacks.poison(cfg, 1, sent, local)["w"], torch.tensor([0.0, 2.0]))
    assert attacks.poison(cfg, 0, sent, local) is local  # honest client
    cfg.fed.attack = "scale"
    assert torch.equal(attacks.poison(cfg, 1, sent, local)["w"], torch.tensor([5.0, -3.0]))
    cfg.fed.attack = "gaussian"
    torch.manual_seed(0)
    noise = attacks.poison(cfg, 1, {"w": torch.zeros(10000)}, {"w": torch.ones(10000)})["w"]
    assert abs(noise.std().item() - 4.0) < 0.1 and abs(noise.mean().item()) < 0.1  # std = scale x RMS(delta)
    cfg.fed.attack = "label_flip"
    assert attacks.flip_labels(cfg, 1, [0, 1, 3], 4) == [3, 2, 0]
    assert attacks.flip_labels(cfg, 0, [0, 1, 3], 4) == [0, 1, 3]
    assert attacks.mark(cfg, 1) == {"malicious": True, "attack": "label_flip"} and attacks.mark(cfg, 0) == {}


@pytest.mark.parametrize("framework", ["fedavg", "split"])
def test_attacker_records_are_marked(tmp_path, framework):
    cfg = tiny_config(tmp_path, framework=framework, fed__rounds=1, fed__attack="scale", fed__attack_scale=50.0,
                      fed__malicious_clients=[2], data__private_size=60, data__test_size=20, split__split_layer=1)
    summary, rundir = run_tiny(cfg)
    records = [json.loads(line) for line in (rundir.path / "metrics.jsonl").read_text().splitlines()]
    clients = {r["client"]: r for r in records if r["client"] != "server"}
    assert clients[2]["malicious"] is True and clients[2]["attack"] == "scale"
    assert "malicious" not in clients[0] and "malicious" not in clients[1]


@pytest.mark.parametrize("overrides, message", [
    ({"fed__attack": "scale", "fed__malicious_clients": [0, 1, 2]}, "fewer clients than fed.clients=3"),
    ({"fed__attack": "scale", "fed__malicious_clients": [5]}, r"client ids in \[0, 3\)"),
    ({"fed__attack": "flood", "fed__malicious_clients": [0]}, "fed.attack must be empty or one of"),
    ({"fed__attack": "scale"}, "set both or neither"),
    ({"framework": "kd", "fed__attack": "sign_flip", "fed__malicious_clients": [0]}, "use label_flip"),
    ({"fed__strategy": "krum"}, r"needs >= 5 sampled clients \(2f\+3\); got 3"),
    ({"fed__trim_fraction": 0.5}, "fed.trim_fraction must be in"),
    ({"fed__norm_bound": -1.0}, "fed.norm_bound must be > 0"),
])
def test_bad_robustness_values_are_one_line_errors(overrides, message):
    with pytest.raises(FedtuneError, match=message) as err:
        tiny_config(None, **overrides)
    assert "\n" not in str(err.value)
