"""Data: reading and checking the text/label CSVs, the public/private/test split and the
partition over clients (tokenization and batching: batching.py)."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DataConfig
from .errors import FedtuneError

# The test subset is the same for every seed so that runs with different seeds are compared
# on the same questions.
TEST_SUBSET_SEED = 1234
AUTO = -1  # data.test_size / public_size / private_size: chosen from the data (resolve_sizes)
# Banking77's demo split, kept wherever it fits data that has a test file of its own.
DEFAULT_TEST, DEFAULT_PUBLIC, DEFAULT_PRIVATE = 400, 500, 900
log = logging.getLogger(__name__)
# Tokenization and batching live in batching.py; their names stay importable from here.
from .batching import Batch, batches, collate, encode  # noqa: E402,F401


@dataclass
class Rows:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> "Rows":
        return Rows([self.texts[i] for i in idx], [self.labels[i] for i in idx])


@dataclass
class FedData:
    label_names: list[str]
    public: Rows
    clients: list[Rows]
    test: Rows
    val: Rows = field(default_factory=lambda: Rows([], []))  # data.val_size rows (none by default)
    # data.client_test_size > 0: each client's own test rows, held out of its shard (hold_out)
    client_tests: list[Rows] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def default_data_dir() -> Path:
    """Banking77 from ``$FEDTUNE_DATA`` or the read-only ``shared/`` beside the checkout."""
    if os.environ.get("FEDTUNE_DATA"):
        return Path(os.environ["FEDTUNE_DATA"])
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / "../shared/data/banking77", Path.cwd() / "shared/data/banking77"]
    candidates += [p / "shared/data/banking77" for p in here.parents]
    for c in candidates:
        if (c / "train.csv").is_file():
            return c.resolve()
    raise FedtuneError(
        "no data given and Banking77 was not found at ../shared/data/banking77; "
        "pass --data DIR (with train.csv and test.csv) or set FEDTUNE_DATA"
    )


def read_csv(path: Path, text_col: str, label_col: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FedtuneError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") would otherwise stick to the first column's name.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FedtuneError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames:
            raise FedtuneError(f"{path}: file is empty")
        missing = [c for c in (text_col, label_col) if c not in reader.fieldnames]
        if missing:
            raise FedtuneError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(reader.fieldnames)} "
                f"(set data.text_column / data.label_column to use other names)"
            )
        rows = []
        # Row numbers are the file's line numbers as an editor shows them (header = line 1).
        for row in reader:
            line = reader.line_num
            text, label = (row.get(text_col) or "").strip(), (row.get(label_col) or "").strip()
            if not text or not label:
                what = text_col if not text else label_col
                raise FedtuneError(f"{path}: row {line}: empty {what!r}")
            rows.append((text, label))
    except csv.Error as exc:
        raise FedtuneError(f"{path}: line {reader.line_num}: not a readable CSV ({exc})") from None
    if not rows:
        raise FedtuneError(f"{path}: file has a header but no rows")
    return rows


def _read_hub(name: str, cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    try:
        import datasets  # optional: only for users who are online
    except ImportError:
        raise FedtuneError(
            f"{name}: not a directory; to use a Hugging Face dataset install the 'datasets' package"
        ) from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # offline, unknown id, no access: datasets raises many types
        offline = " (offline: set HF_HUB_OFFLINE=0 to download it)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise FedtuneError(f"{name}: cannot load the dataset{offline}: {str(exc).splitlines()[0]}") from None
    out = []
    for split in ("train", "test"):
        part = ds[split]
        feature = part.features[cfg.label_column]
        names = getattr(feature, "names", None)
        out.append(
            [(str(t), names[l] if names else str(l)) for t, l in zip(part[cfg.text_column], part[cfg.label_column])]
        )
    return out[0], out[1]


def resolved_path(cfg: DataConfig) -> str:
    """Where the data is read from, as config.toml records it: an absolute directory or file
    (the default directory included), or a hub dataset id."""
    root = Path(cfg.path).expanduser() if cfg.path else default_data_dir()
    return str(root.resolve()) if root.is_dir() or root.is_file() else cfg.path


def read_raw(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]], Path | str]:
    root = Path(cfg.path).expanduser() if cfg.path else default_data_dir()
    if root.is_dir():
        return (
            read_csv(root / "train.csv", cfg.text_column, cfg.label_column),
            read_csv(root / "test.csv", cfg.text_column, cfg.label_column),
            root,
        )
    if root.is_file():
        raise FedtuneError(f"{root}: is a file; --data takes the directory that holds train.csv and test.csv "
                           "(prompt/response rows in one file: --task sft, docs/sft.md)")
    if cfg.path and not cfg.path.startswith((".", "/", "~")) and cfg.path.count("/") == 1:
        train, test = _read_hub(cfg.path, cfg)
        return train, test, cfg.path
    raise FedtuneError(f"{root}: data directory not found (expected train.csv and test.csv in it)")


def iid_partition(n: int, clients: int, rng: random.Random) -> list[list[int]]:
    idx = list(range(n))
    rng.shuffle(idx)
    return [sorted(idx[c::clients]) for c in range(clients)]


def dirichlet_partition(labels: list[int], clients: int, alpha: float, rng: random.Random) -> list[list[int]]:
    """Label skew: each label's rows are spread over clients by proportions ~ Dir(alpha)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    shards: list[list[int]] = [[] for _ in range(clients)]
    dist = torch.distributions.Dirichlet(torch.full((clients,), float(alpha)))
    for y in sorted(by_label):
        rows = by_label[y]
        rng.shuffle(rows)
        # torch.distributions draws from the global RNG; fork it so the draw is seeded.
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            p = dist.sample()
        cuts = (torch.cumsum(p, 0) * len(rows)).round().long().tolist()
        start = 0
        for c, end in enumerate(cuts):
            shards[c] += rows[start:end]
            start = end
    return [sorted(s) for s in shards]


def load(cfg: DataConfig, clients: int, seed: int, public_rows: bool = True) -> FedData:
    """Read, check and split the data. Deterministic given (cfg, clients, seed); auto sizes in
    ``cfg`` become numbers (``resolve_sizes``; ``public_rows``: the framework reads public rows)."""
    train_rows, test_rows, root = read_raw(cfg)
    names = label_names(train_rows, cfg.max_labels)
    index = {n: i for i, n in enumerate(names)}
    test_file = f"{root}/test.csv" if isinstance(root, Path) else f"{root}:test"
    test = labelled_test(test_rows, index, test_file, reduced=bool(cfg.max_labels))
    pool = Rows([t for t, l in train_rows if l in index], [index[l] for t, l in train_rows if l in index])
    resolve_sizes(cfg, len(pool), len(test), public_rows, str(root))
    public, private, val = public_and_private(pool, set(test.texts), cfg, seed)
    shards, tests = hold_out(partition(private, clients, cfg, seed), cfg.client_test_size, seed)
    return FedData(names, public, [private.subset(s) for s in shards], test_subset(test, cfg.test_size), val,
                   [private.subset(t) for t in tests])


def resolve_sizes(cfg: DataConfig, train_rows: int, test_rows: int | None, public_rows: bool, where: str) -> None:
    """Replace each auto (-1) size in ``cfg`` by a number, in place, and say so in one line.

    ``test_rows`` is None when the test rows are held out of the training rows (a single file).
    With a test file, and when 500 public + 900 private rows fit (Banking77), the sizes are 400,
    500 and 900. Otherwise: test = a tenth of the rows held out (1 to 400); public = half the rest
    up to 500 for a framework that reads public rows (kd), else 0; private = every row left."""
    sizes = {"test_size": cfg.test_size, "public_size": cfg.public_size, "private_size": cfg.private_size}
    if AUTO not in sizes.values():
        return
    test = cfg.test_size
    if test == AUTO:
        test = min(DEFAULT_TEST, test_rows) if test_rows is not None else min(DEFAULT_TEST, max(1, train_rows // 10))
    held = 0 if test_rows is not None else test or max(1, train_rows // 10)
    pool = max(train_rows - held - cfg.val_size, 0)  # validation rows are never public or private
    public, private = cfg.public_size, cfg.private_size
    want_public = DEFAULT_PUBLIC if public == AUTO else public
    want_private = DEFAULT_PRIVATE if private == AUTO else private or pool - want_public
    if test_rows is not None and want_private >= 1 and want_public + want_private <= pool:
        public, private = want_public, DEFAULT_PRIVATE if private == AUTO else private
    else:
        if public == AUTO:
            room = pool - max(private, 0)
            public = max(min(DEFAULT_PUBLIC, room // 2), 0) if public_rows else 0
        if private == AUTO:
            private = max(pool - public, 0)
    cfg.test_size, cfg.public_size, cfg.private_size = test, public, private
    # The demo split (400, 500, 900) is what the docs promise; only sizes that depart from it are news.
    chosen = {"test_size": (test, DEFAULT_TEST), "public_size": (public, DEFAULT_PUBLIC), "private_size": (private, DEFAULT_PRIVATE)}
    if all(v != AUTO or chosen[k][0] == chosen[k][1] for k, v in sizes.items()):
        return
    auto = ", ".join(f"data.{k}" for k, v in sizes.items() if v == AUTO)
    log.info("data: %d test, %d public, %d private rows of %s (%s chosen from the data; set them to change)",
             test, public, private, where, auto)


def label_names(train_rows: list[tuple[str, str]], max_labels: int) -> list[str]:
    """Every label in the training rows, sorted; with max_labels, the most frequent ones."""
    counts = Counter(label for _, label in train_rows)
    if max_labels:
        return sorted(sorted(counts, key=lambda n: (-counts[n], n))[:max_labels])
    return sorted(counts)


def labelled_test(test_rows: list[tuple[str, str]], index: dict[str, int], test_file: str, reduced: bool) -> Rows:
    test = Rows([], [])
    for line, (text, label) in enumerate(test_rows, start=2):
        if label not in index:
            if reduced:
                continue  # a label deliberately left out of a reduced task
            raise FedtuneError(f"{test_file}: row {line}: label {label!r} never appears in training data")
        test.texts.append(text)
        test.labels.append(index[label])
    return test


def public_and_private(pool: Rows, test_texts: set[str], cfg: DataConfig, seed: int) -> tuple[Rows, Rows, Rows]:
    """The pool shuffled by seed: the public set from its front, the private set from its back, so
    sweeping public_size never changes the clients' data; the validation rows (data.val_size)
    from the front of what lies between, so they never change the clients' data either."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    # Rows whose text is also a test question go to the back (the private end): the public set,
    # which KD's server model learns from, then never holds a test question unless it must
    # (Banking77 has 6 such texts; the paper split puts 3 of them in its public set otherwise).
    order = [i for i in order if pool.texts[i] not in test_texts] + [i for i in order if pool.texts[i] in test_texts]
    if cfg.public_size >= len(pool) and not cfg.private_size:
        raise FedtuneError(
            f"data.public_size ({cfg.public_size}) leaves no private rows: only {len(pool)} training rows "
            f"are available"
        )
    private_size = cfg.private_size or len(pool) - cfg.public_size - cfg.val_size
    if private_size < 1 or cfg.public_size + private_size + cfg.val_size > len(pool):
        raise FedtuneError(
            f"data.public_size ({cfg.public_size}) + data.private_size ({private_size}){val_text(cfg)} exceed the "
            f"{len(pool)} training rows available"
        )
    public = order[: cfg.public_size]
    if cfg.public_skew:  # the public set drawn label-skewed; the private set as before from what is left
        test_rows = [i for i in order if pool.texts[i] in test_texts]
        public = skewed_order([i for i in order if pool.texts[i] not in test_texts], pool.labels, cfg.public_skew,
                              seed) + test_rows
        public = public[: cfg.public_size]
    chosen = set(public)
    rest = [i for i in order if i not in chosen]
    return pool.subset(public), pool.subset(rest[len(rest) - private_size :]), pool.subset(rest[: cfg.val_size])


def val_text(cfg: DataConfig) -> str:
    return f" + data.val_size ({cfg.val_size})" if cfg.val_size else ""


def skewed_order(order: list[int], labels: list[int], skew: float, seed: int) -> list[int]:
    """``order`` reordered so that its front (the public set) draws label y with weight
    w_y = exp(-skew * y / (labels - 1)): weighted sampling without replacement by the keys
    E_i / w_y, E_i ~ Exp(1) (Efraimidis and Spirakis, 2006)."""
    n_labels = max(labels) + 1
    rng = random.Random(f"public-skew-{seed}")
    weight = [math.exp(-skew * y / max(n_labels - 1, 1)) for y in range(n_labels)]
    key = {i: rng.expovariate(1.0) / weight[labels[i]] for i in order}
    return sorted(order, key=key.__getitem__)


def partition(private: Rows, clients: int, cfg: DataConfig, seed: int) -> list[list[int]]:
    """The private rows over the clients (data.partition); every client gets at least one row."""
    rng = random.Random(f"partition-{seed}")
    if cfg.partition == "iid":
        shards = iid_partition(len(private), clients, rng)
    else:
        shards = dirichlet_partition(private.labels, clients, cfg.dirichlet_alpha, rng)
    for c, shard in enumerate(shards):
        if not shard:
            raise FedtuneError(
                f"client {c} was left with no data ({len(private)} private rows over {clients} clients, "
                f"partition={cfg.partition}); use fewer clients, more data or a larger dirichlet_alpha"
            )
    return shards


def hold_out(shards: list[list[int]], size: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """data.client_test_size: each client's own test rows, a seeded draw from its own shard, so
    they follow the partition rule of its training rows and never overlap them. A client keeps at
    least half its shard for training: a shard of n rows gives min(size, n // 2) test rows."""
    if not size:
        return shards, []
    train, tests = [], []
    for c, shard in enumerate(shards):
        drawn = set(random.Random(f"client-test-{seed}-{c}").sample(shard, min(size, len(shard) // 2)))
        train.append([i for i in shard if i not in drawn])
        tests.append(sorted(drawn))
    return train, tests


def test_subset(test: Rows, size: int) -> Rows:
    """A fixed subset, the same for every seed, so runs with different seeds see the same questions."""
    if size and size < len(test):
        return test.subset(sorted(random.Random(TEST_SUBSET_SEED).sample(range(len(test)), size)))
    return test
