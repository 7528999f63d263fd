"""Reading a configuration: TOML/YAML files, ``section.key=value`` overrides (``--set``) and
the coercion of either into the declared field types."""

from __future__ import annotations

import ast
import dataclasses
import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import FedtuneError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def known_keys(cfg: Any) -> list[str]:
    """Every ``section.key`` (and top-level key) of the run config ``cfg``."""
    keys = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{g.name}" for g in fields(value)]
        else:
            keys.append(f.name)
    return keys


def _coerce_table(key: str, typ: Any, value: Any) -> dict[str, Any]:
    """``{1 = 2, 6 = 4}`` or ``1:2,6:4`` on the command line, a table in TOML."""
    if isinstance(value, str):
        text = value.strip().strip("{}")
        pairs = [p.replace(":", "=").split("=", 1) for p in text.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise FedtuneError(f"config key {key!r}: expected {{round = rank, ...}}, got {value!r}")
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict):
        raise FedtuneError(f"config key {key!r}: expected a table {{round = rank, ...}}, got {value!r}")
    try:
        return {str(int(str(k))): _coerce(key, typ.__args__[1], v) for k, v in value.items()}
    except ValueError:
        raise FedtuneError(f"config key {key!r}: table keys must be integers, got {list(value)}") from None


def _coerce_list(key: str, typ: Any, value: Any) -> list[Any]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = ast.literal_eval(text)
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    (inner,) = typ.__args__
    return [_coerce(key, inner, v) for v in value]


def _coerce_scalar(typ: Any, value: Any) -> Any:
    """Raises ValueError or TypeError when ``value`` is not a ``typ``."""
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if typ is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
    if typ is float:
        return float(value)
    if typ is str:
        return str(value)
    return value


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn a TOML value or a command-line string into the field's declared type."""
    origin = getattr(typ, "__origin__", None)
    if origin is dict:
        return _coerce_table(key, typ, value)
    if origin is list:
        return _coerce_list(key, typ, value)
    try:
        return _coerce_scalar(typ, value)
    except (TypeError, ValueError):
        raise FedtuneError(f"config key {key!r}: expected {typ.__name__}, got {value!r}") from None


def _alias(key: str, value: Any) -> tuple[str, Any] | None:
    """train.bf16 (a bool) is another spelling of train.precision: true = bf16, false = leave it;
    config files that set it keep loading. -> (key, value) to set, or None."""
    if key != "train.bf16":
        return key, value
    return ("train.precision", "bf16") if _coerce(key, bool, value) else None


def set_key(cfg: Any, key: str, value: Any) -> None:
    """Set ``section.key`` (or a top-level key) on the run config ``cfg``, with type checking."""
    aliased = _alias(key, value)
    if aliased is None:
        return
    key, value = aliased
    keys = known_keys(cfg)
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FedtuneError(f"unknown config key {key!r}{hint}")
    target: Any = cfg
    *path, name = key.split(".")
    for part in path:
        target = getattr(target, part)
    typ = get_type_hints(type(target))[name]
    setattr(target, name, _coerce(key, typ, value))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``--set key=value`` arguments as ``{key: value}`` (values stay strings until set_key)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise FedtuneError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lora_r": 8}}`` -> ``{"model.lora_r": 8}``."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        # A table whose keys are all integers is a value (model.rank_schedule: round -> rank).
        if isinstance(v, dict) and not (v and all(str(key).lstrip("-").isdigit() for key in v)):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def read_tree(path: str | Path) -> dict[str, Any]:
    """A TOML or YAML file as nested tables; a one-line error naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FedtuneError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            tree = yaml.safe_load(text) or {}
        else:
            tree = tomllib.loads(text)
    except Exception as exc:  # both parsers raise their own error types
        raise FedtuneError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(tree, dict):
        raise FedtuneError(f"{path}: must be a table of sections")
    return tree


def read_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a flat ``{"section.key": value}`` dict."""
    return flatten(read_tree(path))
