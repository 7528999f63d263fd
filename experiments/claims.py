"""The claims table: each claim of the seed papers and of the method papers fedtune implements,
beside fedtune's measured figure from a committed report and one verdict.

    python experiments/claims.py                      # writes docs/results/claims.md

A claim about accuracy is read from the report's per-seed test figures (the chosen point where
the report chose on validation): the paired difference method - baseline over the seeds both
have, with its 95% t interval (fedtune.report.stats). It is **reproduced** when the interval lies
on the side the paper claims, **contradicted** when it lies on the other side, and **not
reproduced** when it holds zero. A claim about traffic or compute names the framework that should
be lowest; it is reproduced when that framework's mean over seeds is the lowest.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from fedtune.report.stats import paired

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


@dataclass
class Claim:
    text: str  # what the paper claims
    source: str  # who claims it
    report: str  # docs/results/<report>/report.json
    method: str = ""  # paired claims: method - baseline has the sign of `better`
    baseline: str = ""
    better: int = 1  # +1: the method is claimed more accurate than the baseline; -1: less; 0: as accurate
    metric: str = ""  # cost claims: "mb" (traffic) or "gflops" (client compute) ...
    lowest: str = ""  # ... and the framework claimed to have the least of it
    among: tuple[str, ...] = ()


CLAIMS = [
    Claim("A proximal term improves on FedAvg under heterogeneous clients", "FedProx (Li et al., MLSys 2020)",
          "strategies", "fedprox", "fedavg"),
    Claim("Control variates correct client drift and beat FedAvg under label skew", "SCAFFOLD (Karimireddy et al., ICML 2020)",
          "strategies", "scaffold", "fedavg"),
    Claim("Server momentum improves on FedAvg under non-IID data", "FedAvgM (Hsu et al., 2019)",
          "strategies", "fedavgm", "fedavg"),
    Claim("FedAdam with a tuned server step beats FedAvg", "Adaptive Federated Optimization (Reddi et al., ICLR 2021)",
          "strategies", "fedadam", "fedavg"),
    Claim("FedYogi with a tuned server step beats FedAvg", "Adaptive Federated Optimization (Reddi et al., ICLR 2021)",
          "strategies", "fedyogi", "fedavg"),
    Claim("FedAdagrad with a tuned server step beats FedAvg", "Adaptive Federated Optimization (Reddi et al., ICLR 2021)",
          "strategies", "fedadagrad", "fedavg"),
    Claim("Exact (stacked) aggregation of heterogeneous ranks beats HetLoRA's zero-padding", "FLoRA (Wang et al., NeurIPS 2024)",
          "hetlora", "hetero (strategy-flora)", "hetero (strategy-hetlora)"),
    Claim("Exact (stacked) aggregation of heterogeneous ranks beats FlexLoRA's SVD redistribution",
          "FLoRA (Wang et al., NeurIPS 2024)", "hetlora", "hetero (strategy-flora)", "hetero (strategy-flexlora)"),
    Claim("Clients of ranks 2-16 beat every client at the weakest client's rank 2", "HetLoRA (Cho et al., EMNLP 2024)",
          "hetlora", "hetero (strategy-hetlora)", "homogeneous (lora_r-2)"),
    Claim("Freezing A (FFA-LoRA) is as accurate as LoRA, with half of LoRA's adapter upload", "FFA-LoRA (Sun et al., ICLR 2024)",
          "peft", "ffa-lora", "lora", better=0),
    Claim("rsLoRA's scale alpha/sqrt(r) learns better than alpha/r at rank 16", "rsLoRA (Kalajdzievski, 2023)",
          "hetlora", "rslora (lora_r-16)", "homogeneous (lora_r-16)"),
    Claim("FedLLM is more accurate than Split-FedLLM", "the framework paper's Table I (100 rounds)",
          "table1", "fedavg", "split"),
    Claim("FedLLM is more accurate than KD-FedLLM", "the framework paper's Table I (100 rounds)",
          "table1", "fedavg", "kd"),
    Claim("KD-FedLLM has the least traffic on classification", "the framework paper's Table I",
          "table1", metric="mb", lowest="kd", among=("fedavg", "kd", "split")),
    Claim("Split-FedLLM has the least client compute", "the framework paper's Table I",
          "table1", metric="gflops", lowest="split", among=("fedavg", "kd", "split")),
]

MARGIN = 0.02  # "as accurate as": the paired interval's lower end within 2 points of the baseline
UNITS = {"mb": "MB per client per round", "gflops": "client GFLOPs per round"}


def comparison(report: str, results: Path = RESULTS) -> dict | None:
    path = results / report / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def paired_row(claim: Claim, found: dict) -> tuple[str, str]:
    entries = {e["name"]: e for e in (found.get("comparison") or {}).get("entries", [])}
    if not entries:
        return "the report holds no per-seed comparison", "not measured"
    missing = [n for n in (claim.method, claim.baseline) if n not in entries]
    if missing:
        return f"no entry {', '.join(missing)} in the report", "not measured"
    a, b = ({int(s): v for s, v in entries[n]["test"].items()} for n in (claim.method, claim.baseline))
    diff = paired(a, b)
    mean = lambda xs: 100 * sum(xs.values()) / len(xs)  # noqa: E731
    text = (f"{claim.method} {mean(a):.1f}% vs {claim.baseline} {mean(b):.1f}%: "
            f"{100 * diff.mean:+.1f} points [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}], {diff.n} seeds")
    if diff.n < 2 or math.isnan(diff.low):
        return text, "not measured (fewer than 2 paired seeds)"
    if claim.better == 0:  # "as accurate": no worse than MARGIN below the baseline, at 95%
        return text, "reproduced" if diff.low > -MARGIN else "contradicted" if diff.high < 0 else "not reproduced"
    low, high = sorted((claim.better * diff.low, claim.better * diff.high))  # > 0: the side the paper claims
    return text, "reproduced" if low > 0 else "contradicted" if high < 0 else "not reproduced"


def cost_row(claim: Claim, found: dict) -> tuple[str, str]:
    means = {s["framework"]: s["stats"][claim.metric][0] for s in found["settings"]
             if s["framework"] in claim.among and s["task"] == "classify"}
    if claim.lowest not in means:
        return f"{claim.lowest} not in the report", "not measured"
    order = sorted(means, key=means.get)
    text = " < ".join(f"{f} {means[f]:.3g}" for f in order) + f" ({UNITS[claim.metric]})"
    return text, "reproduced" if order[0] == claim.lowest else "contradicted"


def table(claims: list[Claim] = CLAIMS, results: Path = RESULTS) -> list[str]:
    rows = ["| claim | source | fedtune measured (report) | verdict |", "|---|---|---|---|"]
    for claim in claims:
        found = comparison(claim.report, results)
        if found is None:
            text, verdict = f"no report in docs/results/{claim.report}", "not measured"
        else:
            text, verdict = (cost_row if claim.metric else paired_row)(claim, found)
        link = f"[{claim.report}]({claim.report}/report.md)"
        rows.append(f"| {claim.text} | {claim.source} | {text} ({link}) | **{verdict}** |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "claims.md"))
    args = ap.parse_args()
    head = ["# Claims of the papers fedtune implements, against fedtune's measurements", "",
            "Written by `python experiments/claims.py` from the committed reports. Accuracy claims: the paired "
            "difference of the final test figure (in points, 95% t interval over the seeds both runs have); "
            "**reproduced** when the interval lies on the side the paper claims, **contradicted** when it lies on "
            "the other, **not reproduced** when it holds zero; an 'as accurate' claim is reproduced when the interval's "
            "lower end is above -2 points. Cost claims: reproduced when the named framework "
            "has the lowest mean. Each report's setting is in its report.md and experiment file.", ""]
    Path(args.out).write_text("\n".join(head + table()) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
