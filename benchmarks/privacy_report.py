"""The privacy report: accuracy under attack per strategy, accuracy against epsilon per framework
and mechanism, from the run directories of experiments/privacy.toml.

    fedtune sweep experiments/privacy.toml
    python benchmarks/privacy_report.py runs/sweep-privacy --out docs/results/privacy
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedtune import config as configlib  # noqa: E402
from fedtune import sweep as sweeplib  # noqa: E402
from fedtune.report import stats  # noqa: E402

STRATEGIES = ["fedavg", "median", "trimmed_mean", "krum", "norm_bound"]
ATTACKS = ["", "scale", "sign_flip", "gaussian", "label_flip"]


def load(sweep: Path) -> list[dict]:
    runs = []
    for d in sorted(p for p in sweep.iterdir() if (p / "config.toml").is_file()):
        if not (d / "summary.json").is_file():
            continue
        cfg = configlib.flatten(configlib.read_tree(d / "config.toml"))
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        last = max(r["round"] for r in records)
        clients = [r for r in records if r["client"] != "server" and r["round"] == last]
        server = [r for r in records if r["client"] == "server" and r["round"] == last][0]
        if cfg["privacy.dp_sgd"]:
            mech, sigma = "DP-SGD", cfg["privacy.noise_multiplier"]
            worst = max(clients, key=lambda r: r["epsilon"])  # the client whose records are least protected
            eps, delta = worst["epsilon"], worst["delta"]
        elif cfg["privacy.central_dp"]:
            mech, sigma, eps, delta = "central DP", cfg["privacy.update_noise_multiplier"], server["epsilon"], server["delta"]
        else:
            mech, sigma, eps, delta = "none", 0.0, math.inf, None
        found = json.loads((d / "audit.json").read_text()) if (d / "audit.json").is_file() else {}
        runs.append({"name": d.name, "seed": cfg["seed"], "framework": cfg["framework"], "strategy": cfg["fed.strategy"],
                     "attack": cfg["fed.attack"], "mech": mech, "sigma": sigma, "eps": eps, "delta": delta,
                     "audited": bool(cfg.get("privacy.audit")), "audit_eps": found.get("audit_epsilon"),
                     "mia_auc": found.get("mia_auc"),
                     "acc": json.loads((d / "summary.json").read_text())["final_test_accuracy"]})
    return runs


def not_run(sweep: Path, runs: list[dict]) -> list[str]:
    """The experiment's points the sweep has not finished."""
    done = {r["name"] for r in runs}
    return [p.name for p in sweeplib.load(sweep / "experiment.toml", out=sweep).points if p.name not in done]


def merged(runs: list[dict]) -> list[dict]:
    """One row per setting: the seeds' mean accuracy with its 95% t interval (``ci``), each seed's
    accuracy in ``by_seed``, and the paired difference against the same framework without DP
    (``diff``, over the seeds both ran)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["framework"], r["strategy"], r["attack"], r["mech"], r["sigma"], r["audited"]), []).append(r)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    rows = [{**rs[0], "acc": mean([r["acc"] for r in rs]), "accs": [r["acc"] for r in rs],
             "by_seed": {r["seed"]: r["acc"] for r in rs}, "ci": stats.t_interval([r["acc"] for r in rs]),
             "audit_eps": mean([r["audit_eps"] for r in rs if r["audit_eps"] is not None]),
             "audit_max": max((r["audit_eps"] for r in rs if r["audit_eps"] is not None), default=None),
             "mia_auc": mean([r["mia_auc"] for r in rs if r["mia_auc"] is not None])}
            for rs in groups.values()]
    base = {r["framework"]: r for r in rows if r["audited"] and r["mech"] == "none" and not r["attack"]}
    for r in rows:
        b = base.get(r["framework"])
        r["diff"] = (stats.paired(r["by_seed"], b["by_seed"]) if r["audited"] and r["mech"] != "none" and b
                     else None)
    return rows


def pct(r: dict) -> str:
    ci = r["ci"]
    if ci.n < 2:
        return f"{100 * r['acc']:.1f}%"
    return f"{100 * ci.mean:.1f} ± {100 * ci.half:.1f}% ({ci.n} seeds)"


def points(diff) -> str:
    if diff is None:
        return ""
    if diff.n < 2:
        return f"{100 * diff.mean:+.1f}"
    return f"{100 * diff.mean:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"


def attack_table(runs: list[dict]) -> list[str]:
    cell = {(r["strategy"], r["attack"]): r for r in runs
            if r["framework"] == "fedavg" and r["mech"] == "none" and not r["audited"]}
    rows = ["| strategy | " + " | ".join(a or "no attack" for a in ATTACKS) + " |", "|---" * (len(ATTACKS) + 1) + "|"]
    for s in STRATEGIES:
        rows.append(f"| {s} | " + " | ".join(pct(cell[s, a]) if (s, a) in cell else "not run" for a in ATTACKS) + " |")
    return rows


def dp_table(runs: list[dict]) -> list[str]:
    rows = ["| framework | mechanism | noise multiplier | epsilon (accountant) | delta | audit lower bound (mean; max) "
            "| MIA AUC | test accuracy, mean ± 95% CI | paired difference to no DP, points [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "" if x is None else f"{x:.3g}"  # noqa: E731
    for r in sorted(dp_runs(runs), key=lambda r: (r["framework"], r["mech"] != "none", r["mech"], r["sigma"])):
        eps = "inf (no DP)" if r["mech"] == "none" else f"{r['eps']:.3g}"
        audit = "" if r["audit_eps"] is None else f"{r['audit_eps']:.2f}; {r['audit_max']:.2f}"
        rows.append(f"| {r['framework']} | {r['mech']} | {r['sigma']:g} | {eps} | {fmt(r['delta'])} | "
                    f"{audit} | {fmt(r['mia_auc'])} | {pct(r)} | {points(r['diff'])} |")
    return rows


def dp_runs(runs: list[dict]) -> list[dict]:
    """The accuracy-against-epsilon points: the audited runs (DP and their no-DP baselines)."""
    return [r for r in runs if r["strategy"] == "fedavg" and not r["attack"] and r["audited"]]


def setting(sweep: Path) -> dict:
    """The experiment's shared setting, read from its first finished point."""
    d = next(p for p in sorted(sweep.iterdir()) if (p / "summary.json").is_file())
    cfg = configlib.flatten(configlib.read_tree(d / "config.toml"))
    clients = cfg["fed.clients"]
    return {"clients": clients, "rows": cfg["data.private_size"] // clients, "test": cfg["data.test_size"],
            "rounds": cfg["fed.rounds"], "labels": cfg["data.max_labels"], "batch": cfg["train.batch_size"],
            "precision": cfg["train.precision"], "canaries": cfg["privacy.audit_canaries"]}


def figure(runs: list[dict], path: Path, s: dict) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"fedavg": "tab:blue", "split": "tab:orange", "kd": "tab:green", "zo": "tab:red"}
    dp = dp_runs(runs)
    for (fw, mech) in sorted({(r["framework"], r["mech"]) for r in dp}):
        pts = sorted((r for r in dp if r["framework"] == fw and r["mech"] == mech), key=lambda r: r["eps"])
        n = max(r["ci"].n for r in pts)
        if mech == "none":
            ax.axhline(100 * pts[0]["acc"], color=colors[fw], ls=":", lw=1, label=f"{fw}, no DP ({n} seeds)")
            continue
        err = [100 * (r["ci"].half if r["ci"].n > 1 else 0.0) for r in pts]
        ax.errorbar([r["eps"] for r in pts], [100 * r["acc"] for r in pts], yerr=err, capsize=3,
                    marker="o" if mech == "DP-SGD" else "s", ls="-" if mech == "DP-SGD" else "--",
                    color=colors[fw], label=f"{fw}, {mech} ({n} seeds)")
    ax.axhline(100 / s["labels"], color="gray", ls="-.", lw=1, label=f"chance ({s['labels']} intents)")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon at the end of the run (log scale; DP-SGD: a record, delta = 1/(10 n), n ~ {s['rows']} rows; "
                  f"central DP: a client, delta = 1/{10 * s['clients']})")
    ax.set_ylabel("test accuracy (%), mean and 95% CI over seeds")
    ax.set_title(f"Accuracy against epsilon: MiniLM-L6 + LoRA, Banking77 ({s['labels']} intents), "
                 f"{s['clients']} clients x {s['rows']} rows, {s['rounds']} rounds", fontsize=10)
    ax.xaxis.label.set_size(8)
    ax.legend(fontsize=7, ncol=2, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/privacy"))
    args = ap.parse_args()
    runs = load(args.sweep)
    settings = merged(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    s = setting(args.sweep)
    figure(settings, args.out / "accuracy_vs_epsilon.png", s)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
    text = [
        "# Privacy and robustness, measured",
        "",
        "```bash",
        "fedtune sweep experiments/privacy.toml",
        f"python benchmarks/privacy_report.py {args.sweep} --out {args.out}",
        "```",
        "",
        f"Setting (experiments/privacy.toml): MiniLM-L6 with LoRA r=8, Banking77's {s['labels']} most frequent "
        f"intents (chance {100 / s['labels']:.0f}%), {s['clients']} clients x {s['rows']} private rows, {s['test']} test "
        f"rows, {s['rounds']} rounds, batch {s['batch']}, {s['precision']} frozen base; 3 seeds for the privacy points "
        "(mean ± 95% t interval over the seeds, and the paired difference against the same framework without DP "
        "over the same seeds), seed 0 for the attacks. A point is one process with one thread on a 2-core CPU.",
        "",
        "## Accuracy under attack (fedavg, 1 of 5 clients malicious)",
        "",
        "Client 0 attacks; `fed.attack_scale` = 10 (scale: 10 x its update; gaussian: noise of 10 x the update's RMS); "
        "`fed.trim_fraction` = 0.2, `fed.krum_f` = 1, `fed.norm_bound` = 3.",
        "",
        *attack_table(settings),
        "",
        "## Accuracy against epsilon",
        "",
        f"DP-SGD: `privacy.clip` = 1, Poisson sampling (each record joins each step with probability "
        f"q = {s['batch']}/{s['rows']}; the noised sum is divided by the expected batch), epsilon of one record of the "
        f"least protected client (delta = 1/(10 n), n its ~{s['rows']} rows with the canaries planted in it) "
        "after its steps; under kd the public rows ride in the same steps, "
        "unclipped, and cost no epsilon (docs/privacy.md). Central DP (DP-FedAvg): `privacy.update_clip` = 5, "
        f"epsilon of a whole client (delta = 1/(10 x {s['clients']})) after {s['rounds']} rounds of Poisson "
        "participation at rate `fed.fraction` = 1. Both from Opacus's RDP accountant. Audit lower bound: the one-run "
        f"audit (Steinke, Nasr & Jagielski, 2023) over {s['canaries']} canaries (each planted or held out by a fair "
        "coin), 95% confidence, the mean over the seeds and the largest seed; MIA AUC: loss-based membership "
        "inference, 200 training rows against 200 test rows (0.5 = no signal), mean over the seeds.",
        "",
        *dp_table(settings),
        "",
        "![accuracy against epsilon](accuracy_vs_epsilon.png)",
        "",
        "## Leakage",
        "",
        "Token recovery from split learning's activations and gradient inversion of fedavg's LoRA update: "
        "[benchmarks/leakage.md](../../../benchmarks/leakage.md).",
        "",
        "## Not measured",
        "",
        *([f"- `{n}`: not run (CPU time ran out)" for n in not_run(args.sweep, runs)] or ["- every point ran"]),
        "",
    ]
    (args.out / "report.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
