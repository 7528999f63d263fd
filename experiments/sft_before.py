"""The untrained model's answers and metrics (round 0) for an sft config, written like a run's
rounds: OUT/samples/round-000.jsonl and OUT/before.json.
    python experiments/sft_before.py experiments/sft.toml OUT [--set key=value ...]"""

import json
import sys
from pathlib import Path

from fedtune import config as configlib
from fedtune.frameworks import FRAMEWORKS
from fedtune.frameworks.base import Context

path, out, *rest = sys.argv[1:]
overrides = configlib.parse_overrides([a for a in rest if a != "--set"])
cfg = configlib.build_config("demo", path, {**overrides, "out": out, "framework": "fedavg"})
Path(out).mkdir(parents=True, exist_ok=True)
metrics = FRAMEWORKS.load("fedavg")(Context.build(cfg)).evaluate(0)
(Path(out) / "before.json").write_text(json.dumps(metrics, indent=1))
print(json.dumps(metrics))
