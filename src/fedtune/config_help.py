"""Every config key with its default and one line of help, read from the typed config itself:
the dataclass fields of ``RunConfig`` and its sections, and the comment written beside (or just
above) each field in the source. The source is found per class (``inspect.getsource``), so the
help follows a section wherever its module lives."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from typing import Any

from .config import RunConfig


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment beside it, else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    own_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            (own_line if not lines[row - 1][:col].strip() else trailing)[row] = text
    found: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name, row = node.target.id, node.lineno
        above, r = [], row - 1
        while r in own_line:
            above.insert(0, own_line[r])
            r -= 1
        found.setdefault(name, trailing.get(row) or " ".join(above))
    return found


def _docstring(cls: type) -> str:
    doc = " ".join((cls.__doc__ or "").split())
    return "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclass's made-up signature: no help


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, dict, bool)) else str(value)


def key_help(cfg_cls: type = RunConfig) -> list[tuple[str, str, str]]:
    """-> [(key, default as written in TOML-ish JSON, one line of help)] for every config key."""
    rows = []
    top = _comments(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        section = _default(f)
        if dataclasses.is_dataclass(section):
            notes = _comments(type(section))
            doc = _docstring(type(section))
            for g in dataclasses.fields(section):
                rows.append((f"{f.name}.{g.name}", _shown(getattr(section, g.name)), notes.get(g.name, "") or doc))
        else:
            rows.append((f.name, _shown(section), top.get(f.name, "")))
    return rows


def listing() -> str:
    rows = key_help()
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    return "\n".join(f"{f'{k} = {d}'.ljust(width)}  {h}".rstrip() for k, d, h in rows)
