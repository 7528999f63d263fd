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
from .figures import FIGURES
from .load import Run, Setting, aggregate, load_runs, mean_std
from .markdown import markdown

__all__ = ["Run", "Setting", "aggregate", "check_claims", "load_runs", "markdown", "mean_std", "ranking",
           "write_report"]


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Aggregate the runs under ``root``; write report.md, report.json and the figures to ``out``."""
    root = Path(root)
    runs = load_runs(root)
    settings = aggregate(runs)
    if not settings:
        raise FedtuneError(f"{root}: no completed runs (no run directory with a {SUMMARY})")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    figures = [name for name, plot in FIGURES.items() if plot(settings, out / name)]
    data = {
        "settings": [{"framework": s.framework, "task": s.task, "values": s.values, "seeds": [r.cfg["seed"] for r in s.runs],
                      "runs": [str(r.path) for r in s.runs], "stats": s.stats} for s in settings],
        "ranking": ranking(settings),
        "claims": check_claims(ranking(settings)),
    }
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    path = out / "report.md"
    path.write_text(markdown(root, runs, settings, figures))
    return path
