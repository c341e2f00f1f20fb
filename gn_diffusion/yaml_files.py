"""Reading YAML that a user hands us: UTF-8 text, one mapping, no aliases, no key given twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """safe_load's YAML without aliases, and without a key given twice in one mapping. An alias
    repeats a node without copying it, so a few hundred bytes of nested aliases expand to
    gigabytes (a "billion laughs"); a config never needs one. A key given twice would silently
    keep the last value."""

    def compose_node(self, parent, index):
        event = self.peek_event() if self.check_event(yaml.AliasEvent) else None
        if event is not None and event.anchor in self.anchors:  # an unknown one stays PyYAML's error
            where = f"*{event.anchor[:40]}, line {event.start_mark.line + 1}"
            raise ConfigError(f"{self.source} uses a YAML alias ({where}); write the value out in full.")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: safe_load's own error, later
            key = self.construct_object(key_node)
            if key in seen:
                raise ConfigError(f"{self.source} gives the key {str(key)[:40]!r} twice (line "
                                  f"{key_node.start_mark.line + 1}); keep one.")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str = "the config") -> Any:
    """YAML text read as safe_load reads it, but refusing aliases and repeated keys (a
    ConfigError naming `source`)."""
    loader = _StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} when empty), each fault one sentence."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass the path of a YAML file such as configs/digits.yaml.")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file such as "
                          "configs/digits.yaml (a setting is written section.key=value).")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} cannot be read); "
                          "save it as UTF-8 YAML, e.g. a copy of configs/digits.yaml.") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}; fix its syntax.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of section names to settings (e.g. model: ..., train: ...).")
    return raw
