"""Sweep reports: every run directory under a folder, grouped by (framework, task, swept
values), averaged over seeds, drawn like the paper's Fig. 3 and Fig. 4, and ranked in the
form of its Table I.

``load`` reads and groups the runs, ``claims`` ranks them against the paper, ``figures``
draws them and ``markdown`` writes report.md; ``write_report`` does all of it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FedtuneError
from ..rundir import SUMMARY
from .claims import check_claims, ranking
from .compare import as_json, compare, read_design
from .figures import FIGURES
from .load import Run, Setting, aggregate, load_runs, mean_std
from .markdown import comparison, markdown

__all__ = ["Run", "Setting", "aggregate", "check_claims", "load_runs", "markdown", "mean_std", "ranking",
           "write_report"]


def write_report(root: str | Path, out: str | Path | None = None, baseline: str = "") -> Path:
    """Aggregate the runs under ``root``; write report.md, report.json and the figures to ``out``.
    ``baseline``: the entry paired differences are taken against (else the experiment's)."""
    root = Path(root)
    runs = load_runs(root)
    settings = aggregate(runs)
    if not settings:
        raise FedtuneError(f"{root}: no completed runs (no run directory with a {SUMMARY})")
    design = read_design(root)
    found, base = compare(runs, settings, design, baseline)
    if design.select:  # the figures, tables and ranking show the chosen points only: nothing is picked on test
        chosen = {id(r) for e in found for r in e.runs.values()}
        settings = aggregate([r for r in runs if id(r) in chosen])
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    figures = [name for name, plot in FIGURES.items() if plot(settings, out / name)]
    data = {
        "settings": [{"framework": s.framework, "task": s.task, "values": s.values, "seeds": [r.cfg["seed"] for r in s.runs],
                      "runs": [str(r.path) for r in s.runs], "stats": s.stats} for s in settings],
        "ranking": ranking(settings),
        "claims": check_claims(ranking(settings)),
        "comparison": as_json(found, base, design),
    }
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    path = out / "report.md"
    path.write_text(markdown(root, runs, settings, figures, comparison(found, base, design)))
    return path
