"""Runtimes move a framework's messages: in one process (the default) or over Flower. One line
each in the registry below (``--runtime``); each module has ``run(cfg, rundir, progress, resume)``."""

from __future__ import annotations

from ..errors import FedtuneError
from ..registry import Registry

RUNTIMES = Registry("runtime", {
    "inprocess": "fedtune.runtimes.inprocess:run",
    "flower-sim": "fedtune.runtimes.flower:run",
    "flower": "fedtune.runtimes.flower:run",
}, traits={"flower-sim": ("flower",), "flower": ("flower",)})  # flower: Flower's protocols (SecAgg+)


def run(cfg, rundir, progress=None, resume=False):
    try:
        runner = RUNTIMES.load(cfg.runtime)
    except ImportError as exc:
        raise FedtuneError(f"runtime {cfg.runtime!r} needs Flower: pip install 'flwr==1.42.0' ({exc})") from None
    return runner(cfg, rundir, progress, resume)
