"""One battery over every registered strategy (``STRATEGIES.names``), on tiny synthetic LoRA
states (two factors and a head, float64): each aggregates without error, equals a hand
computation, and a state_dict saved after round 1 and loaded into a fresh strategy gives the
same round 2 and the same per-client states; a tiny run under Flower's simulation engine gives
the same records as in process. Rank-aware strategies (the ``rank_aware`` trait)
get clients of different ranks, the others clients of one rank."""

from __future__ import annotations

import io

import pytest
import torch

from fedtune.config import RunConfig
from fedtune.strategies import STRATEGIES
from test_lora import A, B, HEAD, client_state, mean_product

WEIGHTS = [10.0, 30.0, 20.0, 5.0, 15.0]  # five clients: enough for krum with f = 1 (2f + 3)
MIXED_RANKS = [1, 2, 2, 3, 4]
SERVER_LR = 0.5


def make(name):
    cfg = RunConfig()
    cfg.fed.strategy, cfg.fed.clients, cfg.fed.server_lr = name, len(WEIGHTS), SERVER_LR
    return STRATEGIES.load(name)(cfg)


def ranked(name) -> bool:
    return STRATEGIES.has(name, "rank_aware")


def current(name):
    return client_state(4 if ranked(name) else 2, 0)


def updates(name, rnd=1):
    ranks = MIXED_RANKS if ranked(name) else [2] * len(WEIGHTS)
    return [(client_state(r, 100 * rnd + i), w) for i, (r, w) in enumerate(zip(ranks, WEIGHTS))]


def server_round(s, x, ups):
    """One round as a framework drives it: down messages (with the strategy's extras), the
    clients' extra tensors back (synthetic: a constant per client), then the aggregate."""
    extras = [s.downlink(x, cid) for cid in range(len(ups))]
    s.receive([{k: torch.full_like(v, 0.1 * (cid + 1)) for k, v in e.items()} for cid, e in enumerate(extras)])
    return s.aggregate(x, ups)


# --------------------------------------------------------------------------- hand computations


def mean(ups, key):
    return sum(s[key] * w for s, w in ups) / sum(w for _, w in ups)


def delta(x, ups):
    return {k: mean(ups, k) - x[k] for k in x}


def adaptive(second_moment):
    """Reddi et al.'s first round: m = (1 - b1) d, v = second_moment(tau^2, d^2)."""
    def rule(x, ups, f):
        out = {}
        for k, d in delta(x, ups).items():
            m = (1 - f.beta1) * d
            v = second_moment(torch.full_like(d, f.tau**2), d * d, f)
            out[k] = x[k] + f.server_lr * m / (v.sqrt() + f.tau)
        return out
    return rule


def krum_chosen(ups, f, keep):
    flat = [torch.cat([s[k].flatten() for k in sorted(s)]) for s, _ in ups]
    n = len(flat)
    scores = []
    for i in range(n):
        d2 = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d2[: n - f - 2]))
    order = sorted(range(n), key=lambda i: (scores[i], i))
    chosen = [ups[i] for i in order[:keep]]
    return {k: mean(chosen, k) for k in ups[0][0]}


def norm_bound(x, ups, f):
    clipped = []
    for s, w in ups:
        d = {k: s[k] - x[k] for k in s}
        norm = sum(float((v**2).sum()) for v in d.values()) ** 0.5
        clipped.append(({k: x[k] + d[k] * min(1.0, f.norm_bound / norm) for k in s}, w))
    return {k: mean(clipped, k) for k in x}


def padded(s, r):
    a, b = s[A], s[B]
    return {A: torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])]),
            B: torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1), HEAD: s[HEAD]}


def hetlora(x, ups, f):
    norm_weighted = [(padded(s, 4), w * float(torch.linalg.matrix_norm(s[B] @ s[A]))) for s, w in ups]
    return {A: mean(norm_weighted, A), B: mean(norm_weighted, B), HEAD: mean(ups, HEAD)}


def truncated_mean_product(ups, r):
    u, sigma, vh = torch.linalg.svd(mean_product(ups))
    return (u[:, :r] * sigma[:r]) @ vh[:r]


HAND = {
    "fedavg": lambda x, ups, f: {k: mean(ups, k) for k in x},
    "fedavgm": lambda x, ups, f: {k: x[k] + f.server_lr * d for k, d in delta(x, ups).items()},  # m_1 = Delta
    "fedadam": adaptive(lambda v, d2, f: f.beta2 * v + (1 - f.beta2) * d2),
    "fedyogi": adaptive(lambda v, d2, f: v - (1 - f.beta2) * d2 * torch.sign(v - d2)),
    "fedadagrad": adaptive(lambda v, d2, f: v + d2),
    "scaffold": lambda x, ups, f: {k: x[k] + f.server_lr * d for k, d in delta(x, ups).items()},
    # products (their factors are defined up to a rotation) and the head
    "hetlora": lambda x, ups, f: {"BA": (h := hetlora(x, ups, f))[B] @ h[A], HEAD: h[HEAD]},
    "flexlora": lambda x, ups, f: {"BA": truncated_mean_product(ups, 4), HEAD: mean(ups, HEAD)},  # r_max = 4
    "flora": lambda x, ups, f: {"BA": mean_product(ups), HEAD: mean(ups, HEAD)},  # exact: stacked
    "median": lambda x, ups, f: {k: torch.stack([s[k] for s, _ in ups]).median(dim=0).values for k in x},  # 5: odd
    "trimmed_mean": lambda x, ups, f: {k: torch.stack([s[k] for s, _ in ups]).sort(dim=0).values[1:4].mean(dim=0)
                                       for k in x},  # 0.2 x 5 = 1 dropped at each end
    "krum": lambda x, ups, f: krum_chosen(ups, f.krum_f, 1),
    "multikrum": lambda x, ups, f: krum_chosen(ups, f.krum_f, len(ups) - f.krum_f),
    "norm_bound": norm_bound,
}


def view(name, state):
    """What the hand computation fixes: the whole state, or a rank strategy's product and head."""
    return {"BA": state[B] @ state[A], HEAD: state[HEAD]} if ranked(name) else state


def test_every_strategy_has_a_hand_computation():
    assert set(HAND) == set(STRATEGIES.names)


@pytest.mark.parametrize("name", STRATEGIES.names)
def test_aggregate_equals_the_hand_computation(name):
    s, x, ups = make(name), current(name), updates(name)
    out = server_round(s, x, ups)
    assert out.keys() == x.keys() and all(torch.isfinite(v).all() for v in out.values())
    expect = HAND[name](x, ups, s.cfg.fed)
    got = view(name, out)
    assert got.keys() == expect.keys()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", STRATEGIES.names)
def test_restored_state_gives_the_same_next_round(name):
    s = make(name)
    x1 = server_round(s, current(name), updates(name, 1))
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)  # as the round loop checkpoints it
    resumed = make(name)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    x2, again = server_round(s, x1, updates(name, 2)), server_round(resumed, x1, updates(name, 2))
    assert x2.keys() == again.keys() and all(torch.equal(x2[k], again[k]) for k in x2)
    for r in (1, 2):  # what each client receives next
        mine, theirs = s.for_client(x2, r), resumed.for_client(x2, r)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def run_overrides(name) -> dict:
    """A tiny fedavg run that fits the strategy's traits: clients of mixed ranks for the
    rank-aware ones, five clients where it tolerates attackers (2f + 3 with f = 1)."""
    kw = {"framework": "fedavg", "fed__strategy": name, "fed__clients": len(WEIGHTS), "data__test_size": 60,
          "data__private_size": 150, "fed__server_lr": SERVER_LR}
    if ranked(name):
        kw["model__client_ranks"] = MIXED_RANKS
    return kw


@pytest.mark.parametrize("name", STRATEGIES.names)
def test_flower_simulation_equals_inprocess(tmp_path, name):
    """The strategy's server state and what it sends each client survive Flower's simulation
    engine unchanged: every record, bytes included, as in process."""
    from conftest import run_tiny, tiny_config
    from test_frameworks import TIMING

    _, ref = run_tiny(tiny_config(tmp_path / "a", **run_overrides(name)))
    _, sim = run_tiny(tiny_config(tmp_path / "b", runtime="flower-sim", **run_overrides(name)))
    drop = TIMING | {"runtime"}
    a = [{k: v for k, v in r.items() if k not in drop} for r in ref.metrics.records()]
    b = [{k: v for k, v in r.items() if k not in drop} for r in sim.metrics.records()]
    assert a == b
