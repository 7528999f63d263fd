"""A registry: the names a user may choose for one thing (a framework, a runtime, a strategy,
a task) and where each lives. The one list behind validation, the CLI's choices and the report.
Entries are "module:attribute" strings, imported on first use, so naming the choices costs no
import of torch or Flower."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import FedtuneError


class Registry:
    def __init__(self, kind: str, entries: dict[str, str], titles: dict[str, str] | None = None):
        self.kind = kind
        self.entries = dict(entries)
        self.titles = dict(titles or {})

    def title(self, name: str) -> str:
        """How reports name the choice (the paper's name where there is one)."""
        return self.titles.get(name, name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def check(self, key: str, name: str) -> None:
        """A one-line error naming the config key, the bad value and the choices."""
        if name not in self.entries:
            raise FedtuneError(f"{key} must be one of {', '.join(self.entries)}; got {name!r}")

    def load(self, name: str) -> Any:
        self.check(self.kind, name)
        module, attr = self.entries[name].split(":")
        return getattr(importlib.import_module(module), attr)
