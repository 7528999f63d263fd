"""A registry: the names a user may choose for one thing (a framework, a runtime, a strategy,
a task, a PEFT method) and where each lives. The one list behind validation, the CLI's choices
and the report. Entries are "module:attribute" strings, imported on first use, so naming the
choices costs no import of torch or Flower.

Each entry may declare *traits*: plain words saying what it does (``uploads_weights``,
``rank_aware``, ``split_cut``...). Rules that cross families (``config/rules.py``) are written
over traits, never over names, so a new method is one file plus one registry line."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import FedtuneError


class Registry:
    def __init__(self, kind: str, entries: dict[str, str], titles: dict[str, str] | None = None,
                 traits: dict[str, tuple[str, ...]] | None = None):
        self.kind = kind
        self.entries = dict(entries)
        self.titles = dict(titles or {})
        self.traits = {name: frozenset((traits or {}).get(name, ())) for name in self.entries}

    def title(self, name: str) -> str:
        """How reports name the choice (the paper's name where there is one)."""
        return self.titles.get(name, name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def has(self, name: str, trait: str) -> bool:
        """Whether entry ``name`` declares ``trait`` (an unknown name has none)."""
        return trait in self.traits.get(name, ())

    def having(self, trait: str) -> tuple[str, ...]:
        """The entries that declare ``trait``, in registry order (for error messages)."""
        return tuple(n for n in self.entries if trait in self.traits[n])

    def check(self, key: str, name: str) -> None:
        """A one-line error naming the config key, the bad value and the choices."""
        if name not in self.entries:
            raise FedtuneError(f"{key} must be one of {', '.join(self.entries)}; got {name!r}")

    def load(self, name: str) -> Any:
        self.check(self.kind, name)
        module, attr = self.entries[name].split(":")
        return getattr(importlib.import_module(module), attr)
