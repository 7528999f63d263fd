"""experiments/claims.py: the verdict of each kind of claim against hand-made per-seed figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "claims.py"
spec = importlib.util.spec_from_file_location("claims", SCRIPT)
claims = importlib.util.module_from_spec(spec)
sys.modules["claims"] = claims  # dataclasses look their module up
spec.loader.exec_module(claims)


def report(root: Path, name: str, tests: dict[str, list[float]], costs: dict[str, float] | None = None) -> None:
    entries = [{"name": n, "test": {str(s): v for s, v in enumerate(vals)}} for n, vals in tests.items()]
    settings = [{"framework": f, "task": "classify", "stats": {"mb": [mb, 0.0]}} for f, mb in (costs or {}).items()]
    (root / name).mkdir()
    (root / name / "report.json").write_text(json.dumps({"comparison": {"entries": entries}, "settings": settings}))


def test_each_verdict_follows_the_paired_interval(tmp_path):
    report(tmp_path, "r", {"base": [0.50, 0.55, 0.60], "up": [0.55, 0.61, 0.64],  # +5, +6, +4: above zero
                           "flat": [0.52, 0.53, 0.61],                              # +2, -2, +1: holds zero
                           "near": [0.495, 0.548, 0.601]},                          # -0.5, -0.2, +0.1
           costs={"fedavg": 0.8, "kd": 0.05, "split": 10.0})
    C = claims.Claim
    rows = claims.table([C("a", "p", "r", "up", "base"), C("b", "p", "r", "up", "base", better=-1),
                         C("c", "p", "r", "flat", "base"), C("d", "p", "r", "near", "base", better=0),
                         C("e", "p", "r", metric="mb", lowest="kd", among=("fedavg", "kd", "split")),
                         C("f", "p", "r", metric="mb", lowest="split", among=("fedavg", "kd", "split")),
                         C("g", "p", "missing", "up", "base")], tmp_path)
    verdicts = [row.rsplit("**", 2)[1] for row in rows[2:]]
    assert verdicts == ["reproduced", "contradicted", "not reproduced", "reproduced", "reproduced", "contradicted",
                        "not measured"]
    assert "up 60.0% vs base 55.0%: +5.0 points [+2.5, +7.5], 3 seeds" in rows[2]  # t(0.975, 2) * 1 / sqrt(3) = 2.48
    assert "kd 0.05 < fedavg 0.8 < split 10" in rows[6]
