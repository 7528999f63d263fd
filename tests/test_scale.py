"""Cross-device scale: 1,000 clients over Banking77's training rows (a Dirichlet partition), 1%
sampled a round. A round works on its sampled clients only: no per-round work over all 1,000."""

from __future__ import annotations

from collections import Counter

from conftest import run_tiny, tiny_config
from fedtune.frameworks import FRAMEWORKS
from fedtune.frameworks.base import Context
from fedtune.runtimes.rounds import sample_clients


def test_a_thousand_clients_touch_only_the_sampled_ones(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **{"fed.clients": 1000, "fed.fraction": 0.01, "fed.rounds": 2, "data.partition": "dirichlet",
                                   "data.private_size": 0, "data.max_labels": 0, "data.test_size": 100})
    touched: Counter = Counter()
    fedavg = FRAMEWORKS.load("fedavg")
    batches, configure = Context.client_batches, fedavg.configure

    def counted_batches(self, rnd, cid, *a, **kw):
        touched["batches", rnd, cid] += 1
        return batches(self, rnd, cid, *a, **kw)

    def counted_configure(self, rnd, cid):
        touched["down", rnd, cid] += 1
        return configure(self, rnd, cid)

    monkeypatch.setattr(Context, "client_batches", counted_batches)
    monkeypatch.setattr(fedavg, "configure", counted_configure)
    summary, rundir = run_tiny(cfg)
    for rnd in (1, 2):
        sampled = sample_clients(cfg, rnd)
        assert len(sampled) == 10
        for kind in ("batches", "down"):
            assert {cid for (k, r, cid) in touched if k == kind and r == rnd} <= set(sampled)
    clients = [r for r in rundir.metrics.records() if r["client"] != "server"]
    assert len(clients) == 20 and sum(v for k, v in touched.items() if k[0] == "down") == 20
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
