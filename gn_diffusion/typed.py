"""Dataclasses built from plain dicts (parsed YAML), judged field by field: unknown keys (with a
close-match suggestion), wrong types, values outside a `Literal`'s choices or a field's bounds,
and non-finite numbers each give one ConfigError sentence naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
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


# accelerate's set_seed seeds numpy's global generator, which takes 0 .. 2**32 - 1 (torch's
# manual_seed takes more); seeds combined with others (diffusion.mixed_seed) come out 64-bit
# unsigned, which torch's generators take.
SEED_MAX = 2**32 - 1


def seed_setting(default: int = 0):
    return setting(default, low=0, high=SEED_MAX)


QUOTE_LIMIT = 60  # characters of a bad value an error message shows


def quoted(value: Any) -> str:
    """repr(value), cut short: a huge value (a YAML alias bomb, a pasted blob) keeps the line short."""
    return _cut(_SHORT.repr(value))


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = QUOTE_LIMIT


def _cut(text: str) -> str:
    return text if len(text) <= QUOTE_LIMIT + 10 else text[:QUOTE_LIMIT] + "..."


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
            raise ConfigError(f"unknown key '{prefix}{_cut(str(key))}'; {_suggest(str(key), list(fields), prefix)}")
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
            raise ConfigError(f"'{name}' is {quoted(value)}; choose one of {', '.join(options)}.")
        return value
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # 'attention_resolutions=16' means [16]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {quoted(value)}.")
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
                raise ConfigError(f"'{name}' must be a finite number, got {quoted(value)}.")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"'{name}' must be {_describe(kind)}, got {quoted(value)}.")


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
            raise ConfigError(f"'{name}' must be {_describe_bounds(bounds)}, got {quoted(value)}.")


def _describe_bounds(b: dict) -> str:
    lo, hi = b["low"], b["high"]
    if hi is None:
        if lo == 0:
            return "positive" if b["low_open"] else "non-negative"
        return f"{'above' if b['low_open'] else 'at least'} {lo}"
    return f"in {'(' if b['low_open'] else '['}{lo}, {hi}{')' if b['high_open'] else ']'}"


def _describe(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(kind, str(kind))


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every setting of dataclass `cls`, nested sections
    included; the help is the field's trailing comment in the source, so the schema documents itself."""
    hints = typing.get_type_hints(cls)
    comments = _trailing_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows += describe_fields(kind, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        bounds = f.metadata.get("bounds")
        kind_text = _type_name(kind) + (f", {_describe_bounds(bounds)}" if bounds else "")
        rows.append((f"{prefix}{f.name}", kind_text, _default_text(default), comments.get(f.name, "")))
    return rows


def _trailing_comments(cls: type) -> dict[str, str]:
    import inspect
    import io
    import tokenize

    comments, line_field = {}, {}
    source = inspect.getsource(cls)
    for line_no, line in enumerate(source.splitlines(), 1):
        name = line.strip().split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and name.isidentifier():
            line_field[line_no] = name
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.start[0] in line_field:
            comments[line_field[token.start[0]]] = token.string.lstrip("# ").strip()
    return comments


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return " | ".join(str(o) for o in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(kind) if a is not type(None)) + " (or null)"
    if origin is list:
        return f"list of {_type_name(typing.get_args(kind)[0])}"
    return getattr(kind, "__name__", str(kind))


def _default_text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


VALUE_WIDTH = 16


def settings_help(cls: type, sections: tuple[str, ...] = (), prefix: str = "",
                  values: tuple[str, dict[str, Any]] | None = None) -> str:
    """A table of the settings of `cls` (only keys under `sections`, when given) for --help: key,
    default and, with `values` (a column name and a nested dict such as Config.to_dict()), the
    value there beside the default."""
    rows = [r for r in describe_fields(cls, prefix) if not sections or r[0].startswith(sections)]
    columns = [["key", *(r[0] for r in rows)], ["default", *(r[2] for r in rows)]]
    if values is not None:
        name, tree = values
        columns.append([name, *(_default_text(_dotted(tree, r[0])) for r in rows)])
    # A value column is as wide as its values up to VALUE_WIDTH; a longer value pushes its row alone.
    widths = [max(map(len, column)) if i == 0 else min(max(map(len, column)), VALUE_WIDTH)
              for i, column in enumerate(columns)]
    kinds = ["type: what it does", *(f"{kind}" + (f": {text}" if text else "") for _, kind, _, text in rows)]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + "  " + kind
             for *cells, kind in zip(*columns, kinds)]
    shown = f"; {values[0]}: the value this command would run with" if values is not None else ""
    return f"settings (section.key=value){shown}:\n" + "\n".join(lines)


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree
