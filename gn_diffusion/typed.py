"""Dataclasses built from plain dicts (parsed YAML), judged field by field: unknown keys (with a
close-match suggestion), wrong types, values outside a `Literal`'s choices or a field's bounds,
and non-finite numbers each give one ConfigError sentence naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

from .errors import ConfigError

_FALSE = ("no", "off", "false")
_TRUE = ("yes", "on", "true")


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A dataclass field whose value must lie in [low, high] (an open end with `*_open`)."""
    bounds = dict(low=low, high=high, low_open=low_open, high_open=high_open)
    return field(default=default, default_factory=factory, metadata={"bounds": bounds})


def positive(default: Any):
    return setting(default, low=0, low_open=True)


def non_negative(default: Any):
    return setting(default, low=0)


def unit_interval(default: float):  # [0, 1)
    return setting(default, low=0, high=1, high_open=True)


def build_typed(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of dataclass `cls` from a nested dict: unknown keys, wrong types, values
    outside a Literal's choices or a field's bounds, and non-finite numbers are ConfigErrors."""
    name = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{name}' must be a mapping of keys to values, not {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'; {_suggest(str(key), list(fields), prefix)}")
    values = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = build_typed(kind, value if value is not None else {}, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
            _check_bounds(values[key], fields[key].metadata.get("bounds"), f"{prefix}{key}")
    return cls(**values)


def _suggest(key: str, options: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys are {', '.join(prefix + o for o in options)}."


def _coerce(value: Any, kind: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin is Literal:
        options = typing.get_args(kind)
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off/yes/on as a boolean
            value = next((o for o in options if o in (_FALSE if not value else _TRUE)), value)
        if value not in options:
            raise ConfigError(f"'{name}' is {value!r}; choose one of {', '.join(options)}.")
        return value
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # 'attention_resolutions=16' means [16]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}.")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"'{name}' must be a finite number, got {value!r}.")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"'{name}' must be {_describe(kind)}, got {value!r}.")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # PyYAML reads '1e-4' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_bounds(value: Any, bounds: dict | None, name: str) -> None:
    if bounds is None or value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        lo, hi = bounds["low"], bounds["high"]
        below = lo is not None and (item <= lo if bounds["low_open"] else item < lo)
        above = hi is not None and (item >= hi if bounds["high_open"] else item > hi)
        if below or above:
            raise ConfigError(f"'{name}' must be {_describe_bounds(bounds)}, got {value}.")


def _describe_bounds(b: dict) -> str:
    lo, hi = b["low"], b["high"]
    if hi is None:
        if lo == 0:
            return "positive" if b["low_open"] else "non-negative"
        return f"{'above' if b['low_open'] else 'at least'} {lo}"
    return f"in {'(' if b['low_open'] else '['}{lo}, {hi}{')' if b['high_open'] else ']'}"


def _describe(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(kind, str(kind))
