"""An empirical lower bound beside every epsilon (``fedtune audit RUN_DIR``; canaries planted by
``privacy.audit``): the one-run audit of Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy
Auditing with One (1) Training Run"). Each canary was planted or held out by an independent
fair coin (canaries.py). The trained model scores each canary by minus its loss; the audit
guesses "in" for the k highest scores and "out" for the k lowest and counts the correct guesses
v of r = 2k. If the training was (epsilon, delta)-DP, v exceeds a Binomial(r, e^eps / (1 +
e^eps)) tail only with the probability their Theorem 3.3 bounds (``p_value``); the reported
``audit_epsilon`` is the largest epsilon that this run's v rejects at confidence 1 - 0.05
(Bonferroni over the k tried). It is a lower bound: a correct accountant's epsilon is never
below it (up to that 5%). Beside it: a loss-based membership-inference AUC, training rows
against held-out test rows."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import scipy.stats
import torch

from .. import data as datalib
from . import canaries as canarylib
from ..training import derive_seed
from .accounting import default_delta

CONFIDENCE = 0.05
AUDIT = "audit.json"
MIA_ROWS = 200  # members and non-members each, for the AUC


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses right] under (eps, delta)-DP with m canaries (their Theorem 3.3,
    as their Algorithm's reference code computes it)."""
    q = 1.0 / (1.0 + math.exp(-eps))  # randomized response's accuracy at eps
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha, tail = 0.0, 0.0
    for i in range(1, v + 1):
        tail += scipy.stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, tail / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = CONFIDENCE) -> float:
    """The largest eps whose p-value for (r guesses, v right) stays below p; 0 when none does."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p and hi < 100:
        lo, hi = hi, hi + 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def one_run(scores: list[float], members: list[bool], delta: float) -> dict:
    """Guess in/out for the top and bottom k scores, over a few k (Bonferroni) -> the best bound."""
    m = len(scores)
    order = sorted(range(m), key=lambda i: scores[i])
    ks = sorted({k for k in (m // 20, m // 10, m // 4, m // 2) if k >= 1})
    best = {"audit_epsilon": 0.0, "audit_guesses": 0, "audit_correct": 0}
    for k in ks:
        right = sum(members[i] for i in order[-k:]) + sum(not members[i] for i in order[:k])
        eps = epsilon_lower_bound(m, 2 * k, right, delta, CONFIDENCE / len(ks))
        if eps >= best["audit_epsilon"]:
            best = {"audit_epsilon": eps, "audit_guesses": 2 * k, "audit_correct": right}
    return best


def auc(members: list[float], others: list[float]) -> float:
    """P[a member's score > a non-member's] (ties count half): the Mann-Whitney statistic."""
    if not members or not others:
        return math.nan
    u = scipy.stats.mannwhitneyu(members, others, alternative="greater").statistic
    return float(u) / (len(members) * len(others))


@torch.no_grad()
def row_losses(task, model, tok, cfg, device, ids: list[list[int]], labels: list) -> list[float]:
    model.eval()
    out = []
    for batch in datalib.batches(ids, labels, 1, tok.pad_token_id, cfg.data.padding, cfg.data.max_length):
        out.append(float(task.loss(model, batch.to(device))))
    return out


def accountant_epsilon(records: list[dict]) -> dict:
    """The run's guarantee for one record: each client's last DP-SGD epsilon (the largest over
    clients), and central DP's (a record lies in one client); the smaller of the two binds."""
    last: dict = {}
    for r in records:
        if "epsilon" in r:
            last[r["client"]] = r
    clients = [r for c, r in last.items() if c != "server"]
    found = {}
    if clients:
        worst = max(clients, key=lambda r: r["epsilon"])
        found["dp_sgd"] = (worst["epsilon"], worst["delta"], worst.get("sampler", "poisson"))
    if "server" in last:
        found["central_dp"] = (last["server"]["epsilon"], last["server"]["delta"], "poisson")
    if not found:
        return {"accountant_epsilon": math.inf, "accountant_delta": None, "mechanism": None}
    name = min(found, key=lambda k: found[k][0])
    eps, delta, sampler = found[name]
    return {"accountant_epsilon": eps, "accountant_delta": delta, "mechanism": name, "sampler": sampler}


def mia_rows(cfg, fed, planted: set[str]) -> tuple[datalib.Rows, datalib.Rows]:
    """Up to MIA_ROWS private training rows (canaries aside) and as many test rows, seeded."""
    rng = random.Random(derive_seed(cfg.seed, "mia"))
    train = [(t, y) for rows in fed.clients for t, y in zip(rows.texts, rows.labels) if t not in planted]
    train = rng.sample(train, min(MIA_ROWS, len(train)))
    test = list(zip(fed.test.texts, fed.test.labels))
    test = rng.sample(test, min(MIA_ROWS, len(test)))
    as_rows = lambda pairs: datalib.Rows([t for t, _ in pairs], [y for _, y in pairs])  # noqa: E731
    return as_rows(train), as_rows(test)


def measure(cfg, model, task, tok, device, fed, records: list[dict]) -> dict:
    """The accountant's epsilon, the one-run audit's lower bound (when canaries were planted) and
    the membership-inference AUC of the trained ``model``."""
    acct = accountant_epsilon(records)
    # a run without DP has no delta of its own: the usual 1e-5, or 1/(10 rows) when smaller
    delta = acct["accountant_delta"] or min(1e-5, default_delta(sum(len(c) for c in fed.clients)))
    out = {**acct, "audit_delta": delta, "audit_epsilon": None}
    cans = canarylib.make(cfg, fed.num_labels) if cfg.privacy.audit else []
    if cans:
        rows = datalib.Rows([c.text for c in cans], [c.label for c in cans])
        losses = row_losses(task, model, tok, cfg, device, task.encode(rows), rows.labels)
        out.update(one_run([-x for x in losses], [c.member for c in cans], delta), audit_canaries=len(cans),
                   audit_confidence=1 - CONFIDENCE)
    else:
        out["audit_note"] = "no canaries: run with privacy.audit = true for the one-run lower bound"
    train, test = mia_rows(cfg, fed, {c.text for c in cans})
    member = row_losses(task, model, tok, cfg, device, task.encode(train), train.labels)
    other = row_losses(task, model, tok, cfg, device, task.encode(test), test.labels)
    out.update(mia_auc=auc([-x for x in member], [-x for x in other]), mia_rows=[len(member), len(other)])
    return out


def write(run_dir: str | Path, result: dict) -> Path:
    path = Path(run_dir) / AUDIT
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def audit_dir(run_dir: str | Path) -> dict:
    """``fedtune audit RUN_DIR``: rebuild the run's final model, data and canaries; write audit.json."""
    from ..inference import load_run
    from ..rundir import RunDir
    from ..tasks import TASKS, make as make_task

    cfg, model, tok, labels = load_run(run_dir)
    task = make_task(cfg.train.task, tok, labels, cfg.data.max_length, cfg)
    fed = TASKS.load(cfg.train.task).load_data(cfg)
    result = measure(cfg, model, task, tok, torch.device("cpu"), fed, RunDir(run_dir).metrics.records())
    write(run_dir, result)
    return result
