"""Small checks that every family's ``validate`` shares."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import FedtuneError


def one_of(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise FedtuneError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def at_least_one(values: dict[str, int]) -> None:
    """Counts that must be >= 1, by key."""
    for key, value in values.items():
        if value < 1:
            raise FedtuneError(f"{key} must be >= 1; got {value}")


def either(names: Iterable[str]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"``: how messages list the choices that fit."""
    names = tuple(names)
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]])) if names else ""
