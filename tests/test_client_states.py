"""Client state over many clients (runtimes/client_states.py): the round's clients' states in
memory and in the checkpoint, every other client's in RUN/client_states/K.pt; a killed run
resumes exactly; checkpoint.pt does not grow with the number of clients holding state."""

from __future__ import annotations

import pytest
import torch

from conftest import run_tiny, tiny_config
from fedtune.console import Progress
from fedtune.errors import FedtuneError
from fedtune.rundir import RunDir
from fedtune.runtimes import run
from fedtune.runtimes.client_states import DIRNAME, ClientStates
from fedtune.runtimes.rounds import sample_clients
from test_frameworks import assert_resume_matches

# 6 clients, 2 a round: rounds 1-4 sample [3, 4], [4, 5], [3, 4], [1, 2] (asserted below). A run
# killed in round 3 after its first client has just read client 3's state back from disk.
SPARSE = dict(fed__clients=6, fed__fraction=0.34, fed__rounds=4, data__test_size=50)
SAMPLED = {1: [3, 4], 2: [4, 5], 3: [3, 4], 4: [1, 2]}


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return {"c": {"w": torch.randn(3, 5, generator=g), "view": base[:, 1::2]},
            "half": torch.randn(7, generator=g).to(torch.bfloat16), "ids": torch.arange(5) * seed,
            "mask": torch.rand(4, generator=g) > 0.5, "meta": [seed, 0.5, "x"]}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_states_round_trip_through_their_files_exactly(tmp_path):
    store = ClientStates(tmp_path / DIRNAME)
    kept = {cid: state(cid + 1) for cid in range(4)}
    for cid, st in kept.items():
        store[cid] = st
    store.spill(keep=[2])
    assert set(store.memory) == {2} and store.disk == {0, 1, 3}
    assert sorted(p.name for p in (tmp_path / DIRNAME).iterdir()) == ["0.pt", "1.pt", "3.pt"]
    assert list(store) == [0, 1, 2, 3] and len(store) == 4 and 3 in store and 7 not in store
    assert all(same(store[cid], kept[cid]) for cid in kept)
    assert set(store.memory) == {2}  # reading a state from disk keeps nothing in memory
    # A state assigned anew supersedes its file, which goes once the next checkpoint is saved.
    store[0] = store[0]
    assert (tmp_path / DIRNAME / "0.pt").is_file() and store.disk == {1, 3}
    store.drop_stale()
    assert not (tmp_path / DIRNAME / "0.pt").exists() and same(store[0], kept[0])
    store.spill(keep=[2])
    # What a checkpoint records rebuilds the same store; a file nothing names is pruned.
    (tmp_path / DIRNAME / "9.pt.tmp").write_bytes(b"cut short")
    again = ClientStates.of_run(tmp_path, {"clients": store.checkpoint()})
    again.prune()
    assert all(same(again[cid], kept[cid]) for cid in kept)
    assert sorted(p.name for p in (tmp_path / DIRNAME).iterdir()) == ["0.pt", "1.pt", "3.pt"]
    (tmp_path / DIRNAME / "1.pt").unlink()
    with pytest.raises(FedtuneError, match=r"client states that are not there \(clients \[1\]\)"):
        ClientStates.of_run(tmp_path, {"clients": store.checkpoint()})


class Watch(Progress):
    """After each round: which clients' states the checkpoint holds and which files are on disk."""

    def __init__(self, rundir):
        self.rundir, self.seen = rundir, {}

    def round_done(self, rnd, server):
        saved = self.rundir.load_checkpoint()["clients"]
        files = sorted(int(p.stem) for p in (self.rundir.path / DIRNAME).glob("*.pt")) \
            if (self.rundir.path / DIRNAME).is_dir() else []
        self.seen[rnd] = (sorted(saved["memory"]), saved["disk"], files)


def test_only_the_rounds_clients_stay_in_memory(tmp_path):
    cfg = tiny_config(tmp_path, fed__strategy="scaffold", **SPARSE)
    assert {rnd: sample_clients(cfg, rnd) for rnd in SAMPLED} == SAMPLED
    rundir = RunDir.create(cfg)
    watch = Watch(rundir)
    run(cfg, rundir, watch)
    had: set[int] = set()
    for rnd, sampled in SAMPLED.items():
        had |= set(sampled)
        memory, disk, files = watch.seen[rnd]
        assert memory == sampled and disk == files == sorted(had - set(sampled))
    # Every client's variate is still there, whether in memory or on disk.
    states = ClientStates.of_run(rundir.path, rundir.load_checkpoint())
    assert list(states) == [1, 2, 3, 4, 5] and all("scaffold_c" in states[c] for c in states)


def test_scaffold_with_clients_on_disk_resumes_exactly(tmp_path):
    assert_resume_matches(tmp_path, kill_round=3, fed__strategy="scaffold", **SPARSE)


def test_personal_states_on_disk_resume_exactly_and_all_reach_adapters(tmp_path):
    records = assert_resume_matches(tmp_path, kill_round=3, fed__personalization="head", data__client_test_size=20,
                                    **SPARSE)
    assert all("client_test_accuracy" in r for r in records if r["client"] != "server")
    whole, resumed = tmp_path / "a" / "run" / "adapters", tmp_path / "b" / "run" / "adapters"
    assert sorted(p.name for p in resumed.iterdir()) == [f"client-{c}" for c in range(1, 6)]
    for c in range(1, 6):  # clients 3 to 5 sat out the last round: their personal heads came from disk
        name = f"client-{c}/adapter_model.safetensors"
        assert (whole / name).read_bytes() == (resumed / name).read_bytes()


def test_checkpoint_does_not_grow_with_the_clients_holding_state(tmp_path):
    # 8 clients, 2 a round, until each has a variate, against 2 clients that both ran once.
    many = tiny_config(tmp_path / "many", fed__strategy="scaffold", fed__clients=8, fed__fraction=0.25, fed__rounds=8,
                       data__test_size=50)
    few = tiny_config(tmp_path / "few", fed__strategy="scaffold", fed__clients=2, fed__rounds=1, data__test_size=50)
    _, many_dir = run_tiny(many)
    _, few_dir = run_tiny(few)
    states = ClientStates.of_run(many_dir.path, many_dir.load_checkpoint())
    assert len(states) == 8 and len(states.memory) == 2
    one_state = (many_dir.path / DIRNAME / f"{min(states.disk)}.pt").stat().st_size
    many_size, few_size = ((d.path / "checkpoint.pt").stat().st_size for d in (many_dir, few_dir))
    assert abs(many_size - few_size) < one_state / 4
