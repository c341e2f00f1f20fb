"""The output folder of a training run: refuse to mix two runs in one folder.

A run saves its config as `<output_dir>/config.yaml`. Starting a run where another one lives is
refused unless the user asks to continue it (`train.resume`, with the same model, diffusion and
data settings) or to replace it (`train.overwrite=true`, which deletes that run's own files
after naming them, and nothing else in the folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import check_checkpoint, find_damage, resume_point
from .config import Config, config_from_dict, save_config
from .errors import UserError
from .layout import RunLayout
# Settings a resumed run may change: they do not alter what has been trained so far.
RESUMABLE = ("train.", "sample.", "eval.", "runtime.", "data.num_workers", "model.gradient_checkpointing")


def flat_config(cfg: Config) -> dict[str, Any]:
    """{'section.key': value} of every setting."""
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def config_differences(old: Config, new: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for every setting that differs, except keys starting with `ignore`."""
    a, b = flat_config(old), flat_config(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(ignore)]


def read_run_config(output_dir: Path) -> Config | None:
    path = RunLayout(output_dir).config
    if not path.is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {})
    except (UserError, yaml.YAMLError):
        raise UserError(f"{path} is not a readable run config; move that folder away or set another train.output_dir.") from None


def existing_run_files(output_dir: Path) -> list[Path]:
    return [path for path in RunLayout(output_dir).run_files if path.exists()]


def plan_output_dir(cfg: Config, model, processes: int = 1) -> Path | None:
    """Check (without writing anything) that this run may use its output folder; returns the
    checkpoint to resume from, if any."""
    t = cfg.train
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file; set train.output_dir to a folder.")
    old = read_run_config(out)
    found = existing_run_files(out)
    if t.resume is not None:
        if old is not None:
            changed = config_differences(old, cfg, ignore=RESUMABLE)
            if changed:
                raise UserError(f"{out} holds a run with other settings ({changed[0]}); resume it with its own "
                                "config or set another train.output_dir.")
        checkpoint = resume_point(out, model, processes) if t.resume == "auto" else Path(t.resume)
        if checkpoint is not None and t.resume != "auto":
            check_checkpoint(checkpoint, model)
            damage = find_damage(checkpoint, model, processes)
            if damage:
                raise UserError(f"checkpoint {checkpoint} is damaged ({damage}); set train.resume=auto to resume "
                                "from the newest complete one, or name another.")
        elif found and old is None:
            raise UserError(f"{out} holds files of another run but no config.yaml; set another train.output_dir.")
        return checkpoint
    if found and not t.overwrite:
        if old is None:
            raise UserError(f"{out} holds files of another run ({found[0].name}); set another train.output_dir "
                            "or train.overwrite=true to replace them.")
        changed = config_differences(old, cfg, ignore=("train.overwrite", "train.resume"))
        if changed:
            raise UserError(f"{out} holds a different run ({changed[0]}); set another train.output_dir "
                            "or train.overwrite=true to replace it.")
        raise UserError(f"{out} already holds this run; set train.resume=auto to continue it "
                        "or train.overwrite=true to start over.")
    return None


def claim_output_dir(cfg: Config) -> None:
    """Main process only, after plan_output_dir: remove a replaced run, then save this config."""
    out = Path(cfg.train.output_dir)
    if cfg.train.overwrite and cfg.train.resume is None:
        found = existing_run_files(out)
        if found:
            print(f"train.overwrite=true: deleting the previous run's {', '.join(p.name for p in found)} in {out}")
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    save_config(cfg, RunLayout(out).config)
