"""The frameworks, by name. Each is one module implementing frameworks.base.Framework."""

from __future__ import annotations

from ..errors import FedtuneError
from .base import ClientResult, Context, Framework, Link


def get(name: str) -> type[Framework]:
    # Imported lazily so that one framework's dependencies never slow down another's start.
    if name == "fedavg":
        from .fedavg import FedAvgFramework

        return FedAvgFramework
    if name == "kd":
        from .kd import KDFramework

        return KDFramework
    if name == "split":
        from .split import SplitFramework

        return SplitFramework
    raise FedtuneError(f"unknown framework {name!r}; choose from fedavg, kd, split")


__all__ = ["ClientResult", "Context", "Framework", "Link", "get"]
