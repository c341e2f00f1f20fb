"""The ablation's results: one row per finished cell, and the tables and plot made from them.

The report is a pure function of the rows and the ablation config, so `--report-only` rebuilds
it byte for byte from a committed results.csv. Files:
  results.csv  one row per cell, one column per `CellResult` field (NaN scores: the cell
               diverged; empty: a score the features cannot give, such as class accuracy)
  results.md   one seed: each cell's scores; several: mean ± sample std over the seeds, with the
               spread of the means across batch sizes
  summary.csv  mean and std over seeds of every (norm, batch size)
  results.png  Frechet distance and held-out loss against the batch size (error bars: std)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .ablation_grid import AblationConfig, Cell, grid_cells, grid_seeds
from .errors import UserError
from .files import atomic_path, write_text_atomic

NAN = math.nan
RESULTS_CSV, RESULTS_MD, SUMMARY_CSV, RESULTS_PNG = "results.csv", "results.md", "summary.csv", "results.png"
SUMMARY_SCORES = ("heldout_loss", "frechet", "kid", "coverage")


@dataclass
class CellResult:
    """One cell's training settings and scores (NaN sample scores: the cell diverged)."""

    norm: str
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    ema_decay: float
    heldout_loss: float
    frechet: float = NAN
    frechet_floor: float = NAN
    frechet_ratio: float = NAN
    kid: float = NAN
    kid_floor: float = NAN
    coverage: Optional[float] = NAN
    kl_uniform: Optional[float] = NAN
    accuracy: Optional[float] = NAN  # class-conditional models only
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    seed: int = 0  # the training seed (results written before seeds were an axis: seed 0)
    commit: str = ""  # the git commit of the code that made it ("-dirty": with uncommitted changes)
    groups: Optional[int] = None  # the cell's grouping, where the grid varies it (see ablation_grid.Cell)
    channels_per_group: Optional[int] = None

    @property
    def cell(self) -> Cell:
        return Cell(self.norm, self.batch_size, self.seed, self.groups, self.channels_per_group)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CellResult":
        return cls(**json.loads(text))

    @classmethod
    def from_csv_row(cls, row: dict[str, str]) -> "CellResult":
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _parse(row[f.name], hints[f.name]) for f in dataclasses.fields(cls) if f.name in row})


def _parse(text: str, kind: Any) -> Any:
    if kind is str:
        return text
    if text == "":
        return None
    return int(text) if kind in (int, Optional[int]) else float(text)


# ---------------------------------------------------------------------------------------------
# Files


def results_csv(rows: list[CellResult]) -> str:
    return _csv_text([f.name for f in dataclasses.fields(CellResult)], [dataclasses.asdict(r) for r in rows])


def read_results_csv(path: Path) -> list[CellResult]:
    with open(path, newline="") as f:
        return [CellResult.from_csv_row(row) for row in csv.DictReader(f)]


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def write_report(out: Path, rows: list[CellResult], ab: AblationConfig, command: Optional[str] = None,
                 *, with_results_csv: bool = True) -> None:
    """The report files of the finished cells in `out` (results.csv only if `with_results_csv`)."""
    if not rows:
        return
    if with_results_csv:
        write_text_atomic(out / RESULTS_CSV, results_csv(rows))
    write_text_atomic(out / RESULTS_MD, markdown_report(rows, ab, command))
    write_text_atomic(out / SUMMARY_CSV, summary_csv(rows, ab))
    plot_results(rows, ab, out / RESULTS_PNG)


def rebuild_report(folder: Path, ab: AblationConfig, command: Optional[str] = None) -> list[CellResult]:
    """Rewrite the report in `folder` from its results.csv, keeping the grid's cells; their rows."""
    path = folder / RESULTS_CSV
    if not path.is_file():
        raise UserError(f"{path} does not exist; run the sweep first, or name the folder that holds its "
                        "results.csv: --report-only FOLDER.")
    cells = set(grid_cells(ab))
    rows = [r for r in read_results_csv(path) if r.cell in cells]
    if not rows:
        raise UserError(f"{path} holds no result of this grid's cells; check grid.norms, grid.batch_sizes and grid.seeds.")
    write_report(folder, rows, ab, command, with_results_csv=False)
    return rows


# ---------------------------------------------------------------------------------------------
# Statistics over seeds


@dataclass
class SeedStats:
    """One score of one (norm, batch size): a value per finished seed (NaN: diverged)."""

    values: list[Optional[float]]

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if v is not None and math.isfinite(v)]

    @property
    def diverged(self) -> int:
        return sum(v is not None and math.isnan(v) for v in self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.finite)) if self.finite else NAN

    @property
    def std(self) -> Optional[float]:
        """The sample standard deviation; None with fewer than two finite values."""
        return float(np.std(self.finite, ddof=1)) if len(self.finite) > 1 else None


def seed_stats(rows: list[CellResult], key: str) -> dict[tuple[str, int], SeedStats]:
    stats: dict[tuple[str, int], SeedStats] = {}
    for r in rows:
        stats.setdefault((r.norm, r.batch_size), SeedStats([])).values.append(getattr(r, key))
    return stats


def summary_csv(rows: list[CellResult], ab: AblationConfig) -> str:
    """Per (norm, batch size): finished seeds, diverged seeds, and each score's mean and std."""
    columns = ["norm", "batch_size", "seeds", "diverged"]
    columns += [f"{key}_{what}" for key in SUMMARY_SCORES for what in ("mean", "std")]
    stats = {key: seed_stats(rows, key) for key in SUMMARY_SCORES}
    table = []
    for norm, batch_size in _grid_pairs(ab):
        loss = stats["heldout_loss"].get((norm, batch_size))
        if loss is None:
            continue
        line = {"norm": norm, "batch_size": batch_size, "seeds": len(loss.values),
                "diverged": stats["frechet"][norm, batch_size].diverged}
        for key in SUMMARY_SCORES:
            s = stats[key][norm, batch_size]
            line.update({f"{key}_mean": s.mean, f"{key}_std": "" if s.std is None else s.std})
        table.append(line)
    return _csv_text(columns, table)


def _grid_pairs(ab: AblationConfig) -> list[tuple[str, int]]:
    return [(norm, b) for norm in ab.grid.norms for b in ab.grid.batch_sizes]


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_report(rows: list[CellResult], ab: AblationConfig, command: Optional[str] = None) -> str:
    lines = _preamble(rows, ab)
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    if len(grid_seeds(ab)) == 1:
        by_cell = {(r.norm, r.batch_size): r for r in rows}
        lines += _pivot("Frechet distance (lower is better)", "frechet", "{:.3f}", by_cell, ab)
        lines += _pivot("Held-out denoising loss (lower is better)", "heldout_loss", "{:.4f}", by_cell, ab)
        lines += _pivot("Class coverage", "coverage", "{:.2f}", by_cell, ab)
    else:
        lines += _mean_table("Held-out denoising loss", "heldout_loss", "{:.4f}", rows, ab)
        lines += _mean_table("Frechet distance", "frechet", "{:.2f}", rows, ab)
        lines += _mean_table("Class coverage", "coverage", "{:.2f}", rows, ab, spread=False)
    return "\n".join(lines)


def _preamble(rows: list[CellResult], ab: AblationConfig) -> list[str]:
    m, base, seeds = ab.base.model, ab.base, grid_seeds(ab)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
    lines = [
        "# Normalization ablation",
        "",
        f"Digits at {m.image_size}x{m.image_size}, base_channels {m.base_channels}, "
        f"channel_mult {m.channel_mult}, {grouping(m)}; {ab.grid.images_seen} training images "
        f"per cell, {seed_text}; {ab.eval.num_samples} samples "
        f"({base.sample.scheduler}, {base.sample.num_inference_steps} steps) per cell.",
        "",
        _floor_line(rows),
        "",
    ]
    commits = sorted({r.commit for r in rows if r.commit})
    if commits:  # results from before commits were recorded say nothing
        lines += [f"Made with commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}.", ""]
    return lines


def _floor_line(rows: list[CellResult]) -> str:
    """The floor every cell was scored beside (one per sweep: the evaluation is the same everywhere)."""
    floor = next((r for r in rows if math.isfinite(r.frechet_floor)), None)
    if floor is None:
        return "Floor: not measured (every finished cell diverged)."
    return (f"Floor (the same count of real training images vs the held-out split): Frechet distance "
            f"{floor.frechet_floor:.3f}, KID x 1e3 {1e3 * floor.kid_floor:.2f}.")


def _pivot(title: str, key: str, spec: str, by_cell: dict, ab: AblationConfig) -> list[str]:
    """A norm x batch-size table of one seed's score; '-' where a cell has not finished."""
    lines = [f"**{title}**", "", *_table_head(ab.grid.batch_sizes, spread=False)]
    for norm in ab.grid.norms:
        values = [getattr(by_cell[norm, b], key) if (norm, b) in by_cell else None for b in ab.grid.batch_sizes]
        lines.append(f"| {norm} | " + " | ".join(_value_text(v, spec) for v in values) + " |")
    return lines + [""]


def _mean_table(title: str, key: str, spec: str, rows: list[CellResult], ab: AblationConfig,
                spread: bool = True) -> list[str]:
    """A norm x batch-size table of one score's mean ± std over seeds, with the spread of the means."""
    seeds = len(grid_seeds(ab))
    stats = seed_stats(rows, key)
    lines = [f"**{title}** (mean ± std over {seeds} training seeds)", "", *_table_head(ab.grid.batch_sizes, spread)]
    for norm in ab.grid.norms:
        cells = [stats.get((norm, b)) for b in ab.grid.batch_sizes]
        texts = [_stats_text(s, spec, seeds) for s in cells] + ([_spread_text(cells)] if spread else [])
        lines.append(f"| {norm} | " + " | ".join(texts) + " |")
    return lines + [""]


def _table_head(sizes: list[int], spread: bool) -> list[str]:
    extra = " spread of means |" if spread else ""
    return ["| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |" + extra,
            "|---|" + "---:|" * (len(sizes) + spread)]


def _value_text(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    return "diverged" if math.isnan(value) else spec.format(value)


def _stats_text(s: Optional[SeedStats], spec: str, seeds: int) -> str:
    if s is None:
        return "-"
    if not s.finite:
        return "diverged"
    text = spec.format(s.mean) + ("" if s.std is None else f" ± {spec.format(s.std)}")
    if s.diverged:
        text += f" ({s.diverged} diverged)"
    if len(s.values) < seeds:  # a sweep still running: say how many seeds the mean is over
        text += f" ({len(s.values)} of {seeds} seeds)"
    return text


def _spread_text(cells: list[Optional[SeedStats]]) -> str:
    """Largest over smallest mean across batch sizes, minus one."""
    means = [s.mean for s in cells if s is not None and s.finite]
    return f"{100 * (max(means) / min(means) - 1):.1f}%" if len(means) > 1 else "-"


# ---------------------------------------------------------------------------------------------
# Plot


def plot_results(rows: list[CellResult], ab: AblationConfig, path: Path) -> None:
    """Frechet distance and held-out loss against the batch size, one line per norm (mean over
    seeds, error bars one std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("frechet", "heldout_loss")):
        _plot_score(ax, seed_stats(rows, key), ab)
    floor = next((r.frechet_floor for r in rows if math.isfinite(r.frechet_floor)), None)
    if floor is not None:
        axes[0].axhline(floor, color="grey", linestyle="--", label="floor (real vs real)")
    _style_axes(*axes, ab.grid.batch_sizes)
    seeds = len(grid_seeds(ab))
    fig.suptitle(f"Norm ablation: {ab.grid.images_seen} training images per cell"
                 + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _plot_score(ax, stats: dict[tuple[str, int], SeedStats], ab: AblationConfig) -> None:
    for norm in ab.grid.norms:
        mine = [(b, stats[norm, b]) for b in sorted(ab.grid.batch_sizes) if (norm, b) in stats]
        if mine:
            errors = [s.std or 0.0 for _, s in mine]
            ax.errorbar([b for b, _ in mine], [s.mean for _, s in mine], yerr=errors if any(errors) else None,
                        marker="o", capsize=3, label=norm)


def _style_axes(ax_fd, ax_loss, batch_sizes: list[int]) -> None:
    from matplotlib.ticker import FormatStrFormatter

    ax_fd.set(yscale="log", ylabel="Frechet distance (classifier features)", title="Sample quality")
    ax_fd.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_fd.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax_loss.set(ylabel="held-out denoising loss", title="Held-out denoising loss")
    for ax in (ax_fd, ax_loss):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.set_xlabel("per-device batch size")
        ax.grid(alpha=0.3)
    ax_fd.legend(fontsize=8)


def grouping(m) -> str:
    """How the group norm groups channels, as the report's setup line says it."""
    return f"groups {m.groups}" if m.groups is not None else f"{m.channels_per_group} channels per group"
