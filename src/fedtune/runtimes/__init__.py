"""Runtimes move a framework's messages: in one process (the default) or over Flower."""

from __future__ import annotations

from ..errors import FedtuneError


def run(cfg, rundir, progress=None, resume=False):
    if cfg.runtime == "inprocess":
        from .inprocess import run as run_inprocess

        return run_inprocess(cfg, rundir, progress, resume)
    if cfg.runtime in ("flower-sim", "flower"):
        try:
            from .flower import run as run_flower
        except ImportError as exc:
            raise FedtuneError(f"runtime {cfg.runtime!r} needs Flower: pip install 'flwr==1.41.0' ({exc})") from None
        return run_flower(cfg, rundir, progress, resume)
    raise FedtuneError(f"unknown runtime {cfg.runtime!r}")
