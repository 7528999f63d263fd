import pytest
import torch

from fedtune.config import RunConfig
from fedtune.strategies import STRATEGIES
from fedtune.strategies.base import weighted_mean
from fedtune.errors import FedtuneError


def test_fedavg_is_the_exact_sample_weighted_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    weights = [1667, 1667, 1667 + 1]
    out = STRATEGIES.load("fedavg")(RunConfig()).aggregate(states[0], list(zip(states, weights)))
    for k in ("a", "b"):
        exact = sum(s[k].double() * w for s, w in zip(states, weights)) / sum(weights)
        assert out[k].dtype == torch.float32
        assert torch.equal(out[k], exact.float())


def test_weights_matter_and_hand_computed_value():
    a, b = {"w": torch.tensor([0.0, 3.0])}, {"w": torch.tensor([1.0, 0.0])}
    out = weighted_mean([a, b], [1, 3])
    assert torch.equal(out["w"], torch.tensor([0.75, 0.75]))


def test_mismatched_states_and_empty_are_errors():
    with pytest.raises(FedtuneError):
        weighted_mean([], [])
    with pytest.raises(FedtuneError, match="different tensor names"):
        weighted_mean([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(FedtuneError, match="fed.strategy must be one of fedavg, .*; got 'fedmagic'"):
        STRATEGIES.load("fedmagic")
