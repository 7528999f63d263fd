from collections import Counter

import pytest
import torch

from fedtune import data as datalib
from fedtune import models
from fedtune.config import DataConfig, ModelConfig
from fedtune.errors import FedtuneError


def test_paper_split_sizes_and_disjointness():
    fed = datalib.load(DataConfig(public_size=5002, private_size=5001, test_size=0), clients=3, seed=0)
    assert len(fed.public) == 5002 and [len(c) for c in fed.clients] == [1667, 1667, 1667]
    assert len(fed.test) == 3080 and fed.num_labels == 77
    public = set(fed.public.texts)
    # Banking77's train.csv has 4 texts that repeat but for trailing spaces; nothing else may overlap.
    assert sum(t in public for c in fed.clients for t in c.texts) <= 4


def test_split_is_deterministic_and_private_set_ignores_public_size():
    a = datalib.load(DataConfig(public_size=500, private_size=900), clients=3, seed=1)
    b = datalib.load(DataConfig(public_size=500, private_size=900), clients=3, seed=1)
    c = datalib.load(DataConfig(public_size=2500, private_size=900), clients=3, seed=1)
    d = datalib.load(DataConfig(public_size=500, private_size=900), clients=3, seed=2)
    assert a.clients[0].texts == b.clients[0].texts
    assert a.clients[0].texts == c.clients[0].texts  # sweeping public_size keeps the clients' data
    assert a.clients[0].texts != d.clients[0].texts


def test_dirichlet_partition_skews_labels_and_covers_every_row():
    cfg = DataConfig(public_size=0, private_size=3000, partition="dirichlet", dirichlet_alpha=0.1)
    fed = datalib.load(cfg, clients=3, seed=0)
    assert sum(len(c) for c in fed.clients) == 3000
    top_share = [Counter(c.labels).most_common(1)[0][1] / len(c) for c in fed.clients]
    iid = datalib.load(DataConfig(public_size=0, private_size=3000), clients=3, seed=0)
    iid_share = [Counter(c.labels).most_common(1)[0][1] / len(c) for c in iid.clients]
    assert min(top_share) > max(iid_share)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
def test_dynamic_padding_matches_fixed_padding(model):
    fed = datalib.load(DataConfig(public_size=0, private_size=64, max_labels=4), clients=1, seed=0)
    net, tok = models.build(ModelConfig(name=model), fed.num_labels, seed=0)
    net.eval()
    ids = datalib.encode(tok, fed.clients[0].texts, 80)
    dyn = datalib.batches(ids, fed.clients[0].labels, 16, tok.pad_token_id, "dynamic", 80)
    fix = datalib.batches(ids, fed.clients[0].labels, 16, tok.pad_token_id, "max_length", 80)
    assert max(b.input_ids.shape[1] for b in dyn) < 80 and all(b.input_ids.shape[1] == 80 for b in fix)
    with torch.no_grad():
        for d, f in zip(dyn, fix):
            a = net(input_ids=d.input_ids, attention_mask=d.attention_mask).logits
            b = net(input_ids=f.input_ids, attention_mask=f.attention_mask).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _write(path, text):
    path.write_text(text)
    return path


def test_csv_errors_name_file_and_row(tmp_path):
    good = "text,category\nhello,a\nworld,b\n"
    _write(tmp_path / "train.csv", good)
    _write(tmp_path / "test.csv", "text,label\nhi,a\n")
    with pytest.raises(FedtuneError, match=r"test.csv: missing column\(s\) category"):
        datalib.read_raw(DataConfig(path=str(tmp_path)))
    _write(tmp_path / "test.csv", "")
    with pytest.raises(FedtuneError, match="test.csv: file is empty"):
        datalib.read_raw(DataConfig(path=str(tmp_path)))
    _write(tmp_path / "test.csv", "text,category\nhi,a\nbye,zzz\n")
    with pytest.raises(FedtuneError, match=r"test.csv: row 3: label 'zzz' never appears in training data"):
        datalib.load(DataConfig(path=str(tmp_path), public_size=0, private_size=2, test_size=0), 1, 0)
    _write(tmp_path / "train.csv", "text,category\nhello,a\n,b\n")
    with pytest.raises(FedtuneError, match=r"train.csv: row 3: empty 'text'"):
        datalib.read_raw(DataConfig(path=str(tmp_path)))
    with pytest.raises(FedtuneError, match="data directory not found"):
        datalib.read_raw(DataConfig(path=str(tmp_path / "nope")))


def test_client_left_without_data_is_an_error():
    with pytest.raises(FedtuneError, match="client 4 was left with no data"):
        datalib.load(DataConfig(public_size=0, private_size=4), clients=5, seed=0)
    with pytest.raises(FedtuneError, match="exceed the 10003 training rows"):
        datalib.load(DataConfig(public_size=6000, private_size=5000), clients=3, seed=0)


def test_val_rows_are_held_out_and_leave_the_clients_data_alone():
    """data.val_size: seeded rows of the training pool, disjoint from public, private and test rows."""
    base = DataConfig(public_size=500, private_size=900, test_size=400)
    a = datalib.load(DataConfig(public_size=500, private_size=900, test_size=400, val_size=300), clients=3, seed=1)
    b = datalib.load(DataConfig(public_size=500, private_size=900, test_size=400, val_size=300), clients=3, seed=1)
    c = datalib.load(DataConfig(public_size=500, private_size=900, test_size=400, val_size=300), clients=3, seed=2)
    none = datalib.load(base, clients=3, seed=1)
    assert len(a.val) == 300 and len(none.val) == 0
    assert a.val.texts == b.val.texts and a.val.texts != c.val.texts  # seeded
    val = set(a.val.texts)
    assert not val & set(a.public.texts) and not val & set(a.test.texts)
    assert not any(t in val for cl in a.clients for t in cl.texts)
    assert [cl.texts for cl in a.clients] == [cl.texts for cl in none.clients]  # the clients' data is unchanged
    assert a.public.texts == none.public.texts
    with pytest.raises(FedtuneError, match="data.val_size"):
        datalib.load(DataConfig(public_size=500, private_size=0, test_size=400, val_size=10**5), clients=3, seed=1)


def test_auto_sizes_leave_room_for_the_val_rows():
    cfg = DataConfig(public_size=-1, private_size=-1, test_size=-1, val_size=100)
    datalib.resolve_sizes(cfg, 1000, None, True, "rows")
    assert cfg.test_size == 100 and cfg.public_size + cfg.private_size + cfg.val_size + cfg.test_size == 1000
