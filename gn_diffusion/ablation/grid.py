"""The normalization ablation's settings and its cells: training seeds x norm kinds (with group
norm's grouping, where the grid varies it) x per-device batch sizes.

Every cell trains on the same number of images; learning-rate warm-up and the EMA half-life are
kept the same in images, so the cells of one seed differ only in the norm, the batch size and
the number of optimizer steps that batch size implies. The seed (initial weights, batches,
noise) is an axis of its own, so every score can be read beside its spread over seeds. Every
cell's config is built and checked (schema, cross-field checks, model shape) before anything runs.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import Config, EvalConfig, apply_overrides, config_from_dict, read_yaml
from ..old_keys import move_old_keys
from ..errors import ConfigError
from ..model.norms import check_norm_name, norm_uses_groups
from ..model.unet import check_model_config
from ..typed import build_typed, positive, setting
from ..typed import SEED_MAX

LrScaling = Literal["none", "sqrt", "linear"]
LR_EXPONENT: dict[str, float] = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
CELL_AXES = ("norms", "groups", "channels_per_group", "batch_sizes", "seeds")  # what cells' folders name
OLD_THREADS_KEY, THREADS_KEY = "threads", "base.runtime.cpu_threads"


@dataclass
class GridConfig:
    norms: list[str] = field(default_factory=lambda: ["group", "batch", "layer", "instance", "none"])
    batch_sizes: list[int] = setting(factory=lambda: [2, 4, 8, 16, 32], low=1)  # per device
    images_seen: int = positive(32000)  # training images per cell: max_steps = images_seen / images per step
    base_batch_size: int = positive(32)  # base.train's lr and warm-up are meant at this batch
    lr_scaling: LrScaling = "none"  # the lr at batch B is lr x (B / base_batch_size)^p, p = 0, 1/2 or 1
    seeds: Optional[list[int]] = setting(None, low=0, high=SEED_MAX)  # training seeds; None: base.train.seed alone
    # Group norm's grouping as an axis (the paper's Table 3): one group-norm row per entry of
    # either list; None for both: base.model's grouping. Norms without groups get one row.
    groups: Optional[list[int]] = setting(None, low=1)  # each a cell's model.groups
    channels_per_group: Optional[list[int]] = setting(None, low=1)  # each a cell's model.channels_per_group


@dataclass
class AblationConfig:
    output_dir: str = "runs/ablation_norms"
    base: Config = field(default_factory=Config)  # the training run every cell starts from; runtime.* says how
    grid: GridConfig = field(default_factory=GridConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # every cell's eval settings (replaces base.eval)
    loss_triples: int = positive(512)  # held-out (image, t, noise) triples of the denoising loss
    quiet_training: bool = True  # hide each cell's inner training progress bar


@dataclass(frozen=True)
class Cell:
    norm: str
    batch_size: int  # per device
    seed: int  # the training seed
    groups: Optional[int] = None  # model.groups of this cell; None (and no channels_per_group): base.model's
    channels_per_group: Optional[int] = None  # model.channels_per_group of this cell

    @property
    def name(self) -> str:
        return f"{self.norm}{self._grouping_tag}-b{self.batch_size}-s{self.seed}"

    @property
    def _grouping_tag(self) -> str:
        if self.groups is not None:
            return f"-g{self.groups}"
        return "" if self.channels_per_group is None else f"-c{self.channels_per_group}"

    @property
    def row(self) -> str:
        """The table row of the cell: its norm, with the grouping where the grid varies it."""
        if self.groups is not None:
            return f"{self.norm} G={self.groups}"
        return self.norm if self.channels_per_group is None else f"{self.norm} {self.channels_per_group} ch/group"


# ---------------------------------------------------------------------------------------------
# Reading


def load_ablation_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AblationConfig:
    """Read an ablation YAML (sections output_dir, base, grid, eval), apply overrides, and check
    it and every cell's config."""
    ab = ablation_from_dict(apply_overrides(read_yaml(Path(path)), overrides))
    validate_ablation(ab, processes=1)
    return ab


def ablation_from_dict(raw: dict[str, Any], *, saved: bool = False) -> AblationConfig:
    """A typed AblationConfig from a nested dict; keys that moved are read under their new names
    (silently, and retired ones dropped, in a config a sweep `saved`: see old_keys)."""
    _move_old_threads(raw, note=not saved)
    if isinstance(raw.get("base"), dict):
        move_old_keys(raw["base"], saved=saved)
    return build_typed(AblationConfig, raw, prefix="")


def _move_old_threads(raw: dict[str, Any], note: bool) -> None:
    """The sweep's threads are base.runtime.cpu_threads now; where both are given, the new key wins."""
    if OLD_THREADS_KEY not in raw:
        return
    value = raw.pop(OLD_THREADS_KEY)
    if raw.get("base") is None:
        raw["base"] = {}
    runtime = raw["base"].setdefault("runtime", {}) if isinstance(raw["base"], dict) else None
    if isinstance(runtime, dict):
        runtime.setdefault("cpu_threads", value)
    if note:
        print(f"note: {OLD_THREADS_KEY} is now {THREADS_KEY}; read as {THREADS_KEY}.", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Checks


def validate_ablation(ab: AblationConfig, processes: int) -> None:
    """Judge the grid, then build (hence check) every cell's training config before any runs."""
    check_grid(ab.grid)
    if ab.base.data.dataset != "digits":
        raise ConfigError("the ablation scores against the held-out digits; set base.data.dataset=digits.")
    for cell in grid_cells(ab):
        cell_config(ab, cell, processes)


def check_grid(g: GridConfig) -> None:
    if not g.norms:
        raise ConfigError("'grid.norms' must name at least one norm kind, e.g. [group, batch].")
    for norm in g.norms:
        check_norm_name(norm, "grid.norms")
    if not g.batch_sizes:
        raise ConfigError("'grid.batch_sizes' must be a non-empty list of positive integers, got [].")
    if g.seeds is not None and not g.seeds:
        raise ConfigError("'grid.seeds' must list at least one training seed, or be null for base.train.seed alone.")
    lists = {"norms": g.norms, "batch_sizes": g.batch_sizes, "seeds": g.seeds or [],
             "groups": g.groups or [], "channels_per_group": g.channels_per_group or []}
    for key, values in lists.items():
        if len(set(values)) != len(values):
            raise ConfigError(f"'grid.{key}' lists a value twice: {values}.")
    _check_grouping_axis(g)


def _check_grouping_axis(g: GridConfig) -> None:
    for key in ("groups", "channels_per_group"):
        values = getattr(g, key)
        if values is None:
            continue
        if not values:
            raise ConfigError(f"'grid.{key}' must list positive integers, or be null; got [].")
        if not any(norm_uses_groups(norm) for norm in g.norms):
            raise ConfigError(f"'grid.{key}' varies group norm's grouping, but no norm in grid.norms {g.norms} "
                              "uses groups; add group to grid.norms, or set "
                              f"grid.{key}=null.")


# ---------------------------------------------------------------------------------------------
# Cells


def grid_seeds(ab: AblationConfig) -> list[int]:
    return ab.grid.seeds if ab.grid.seeds is not None else [ab.base.train.seed]


def grid_cells(ab: AblationConfig) -> list[Cell]:
    """Every cell, seed by seed (so a whole grid is finished before the next seed starts), then
    norm by norm (a grouped norm grouping by grouping), each row's batch sizes in the order given."""
    g = ab.grid
    return [Cell(norm, batch_size, seed, groups, per_group)
            for seed in grid_seeds(ab) for norm in g.norms for groups, per_group in groupings(g, norm)
            for batch_size in g.batch_sizes]


def groupings(g: GridConfig, norm: str) -> list[tuple[Optional[int], Optional[int]]]:
    """The (groups, channels_per_group) of `norm`'s rows: the grid's where it varies them."""
    if not norm_uses_groups(norm) or not varies_grouping(g):
        return [(None, None)]
    return [(n, None) for n in g.groups or []] + [(None, c) for c in g.channels_per_group or []]


def varies_grouping(g: GridConfig) -> bool:
    return g.groups is not None or g.channels_per_group is not None


def row_cells(ab: AblationConfig) -> dict[str, Cell]:
    """The tables' rows, in grid order, each with its first cell (which gives its norm and grouping)."""
    rows: dict[str, Cell] = {}
    for cell in grid_cells(ab):
        rows.setdefault(cell.row, cell)
    return rows


def grid_rows(ab: AblationConfig) -> list[str]:
    """The tables' rows, in grid order."""
    return list(row_cells(ab))


def cell_output_dir(ab: AblationConfig, cell: Cell) -> Path:
    return Path(ab.output_dir) / "cells" / cell.name


def cell_config(ab: AblationConfig, cell: Cell, processes: int) -> Config:
    """The checked training config of one cell: same images seen, schedules kept in images."""
    base = ab.base.train
    train = dataclasses.replace(base, batch_size=cell.batch_size, seed=cell.seed)
    per_step = train.images_per_step(processes)
    if ab.grid.images_seen % per_step:
        raise ConfigError(
            f"'grid.images_seen' {ab.grid.images_seen} is not a multiple of the {per_step} images per step "
            f"of batch size {cell.batch_size}; use a multiple of every batch size x accumulation x processes."
        )
    ratio = per_step / ab.grid.base_batch_size
    train = dataclasses.replace(
        train,
        max_steps=ab.grid.images_seen // per_step,
        lr=base.lr * ratio ** LR_EXPONENT[ab.grid.lr_scaling],
        warmup_steps=round(base.warmup_steps / ratio),
        output_dir=str(cell_output_dir(ab, cell)),
        resume="auto",  # a cell killed mid-training continues from its last checkpoint
    )
    model = dataclasses.replace(ab.base.model, norm=cell.norm)
    if cell.groups is not None or cell.channels_per_group is not None:
        model = dataclasses.replace(model, groups=cell.groups, channels_per_group=cell.channels_per_group)
    return _checked(dataclasses.replace(ab.base, model=model, train=train, eval=ab.eval), cell)


def _checked(cfg: Config, cell: Cell) -> Config:
    """cfg read back through the schema and the model-shape checks, errors naming the cell."""
    try:
        cfg = config_from_dict(cfg.to_dict())
        check_model_config(cfg.model)
    except ConfigError as exc:
        raise ConfigError(f"cell {cell.name}: {exc}") from None
    return cfg


def sweep_identity(ab: AblationConfig) -> dict[str, Any]:
    """The settings finished cells depend on: all but the list of cells (norms, groupings, batch
    sizes and seeds: a cell's folder names them all), the folder, and how the sweep runs here
    (base.runtime, quiet_training); base.eval gives way to the top-level eval."""
    raw = asdict(ab)
    for key in ("output_dir", "quiet_training"):
        raw.pop(key)
    for key in ("runtime", "eval"):
        raw["base"].pop(key)
    raw["base"]["train"].pop("seed")
    raw["grid"] = {k: v for k, v in raw["grid"].items() if k not in CELL_AXES}
    return raw
