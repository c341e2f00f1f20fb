"""Config keys that moved or were retired, in one place. Where a person wrote them, a moved key
is read under its new name with a note and a retired one is refused; in a config an older
version saved (a run folder's or model folder's config.yaml), both are read silently (a retired
one dropped), so old runs and models stay usable without notes about files nobody wrote."""

from __future__ import annotations

import sys
from typing import Any

from .errors import ConfigError

# Keys that moved, read from older configs and command lines with a note naming the new key.
MOVED = {
    "model.kernels": "runtime.backend",
    "train.cpu": "runtime.cpu",
    "train.cpu_threads": "runtime.cpu_threads",
    "train.sample_images": "train.sample_num_images",  # images to generate are num_images everywhere
    "eval.num_samples": "eval.num_images",
    "grid.reference_batch_size": "grid.base_batch_size",  # the ablation's grid; "reference" is the held-out images
}

# Keys that are gone, with what took their place; a config or command line naming one is refused.
RETIRED = {
    "train.ema_decay": "the EMA is a half-life in training images now: set train.ema_halflife_images instead (a decay "
                       "d per step of B images is a half-life of B x ln(0.5) / ln(d) images)",
    "train.ema_warmup": "the EMA's warm-up is train.ema_rampup now (0 turns it off)",
}


def move_old_keys(raw: dict[str, Any], *, saved: bool = False) -> dict[str, Any]:
    """Move the keys of MOVED to their new place in a nested dict (in place); returns `raw`.
    Where both are given, the new key wins. A retired key is a ConfigError, or, in a config an
    older version saved (`saved`), dropped."""
    for key in RETIRED:
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            if not saved:
                _refuse_retired(key)
            del raw[section][name]
    for old, new in MOVED.items():
        section, key = old.split(".")
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            value = values.pop(key)
            new_section, new_key = new.split(".")
            target = raw.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new_key, value)
            if not saved:
                _note_moved(old)
    return raw


def new_name(key: str) -> str:
    if key in RETIRED:
        _refuse_retired(key)
    if key in MOVED:
        _note_moved(key)
        return MOVED[key]
    return key


def _refuse_retired(key: str) -> None:
    raise ConfigError(f"{key} is no longer a setting; {RETIRED[key]}.")


def _note_moved(old: str) -> None:
    print(f"note: {old} is now {MOVED[old]}; read as {MOVED[old]}.", file=sys.stderr)
