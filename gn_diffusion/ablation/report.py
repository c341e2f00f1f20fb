"""The ablation's report: the tables and plot made from the finished cells' results.

The report is a pure function of the rows and the ablation config, so `--report-only` rebuilds
it byte for byte from a committed results.csv. Files:
  results.csv  one row per cell, one column per `CellResult` field (NaN scores: the cell
               diverged; empty: a score the features cannot give, such as class accuracy)
  results.md   one seed: each cell's scores; several: mean ± sample std over the seeds, with the
               spread of the means across batch sizes
  summary.csv  mean and std over seeds of every (norm, batch size)
  results.png  Frechet distance and held-out loss against the batch size, or against the grouping
               where the grid varies it (error bars: std); see plot.py
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..files import write_text_atomic
from .grid import AblationConfig, Cell, grid_cells, grid_rows, grid_seeds, row_cells, varies_grouping
from .results import (PAPER_COLUMN, CellResult, SeedStats, csv_text, paper_error, read_results_csv, results_csv,
                      seed_stats)

RESULTS_CSV, RESULTS_MD, SUMMARY_CSV, RESULTS_PNG = "results.csv", "results.md", "summary.csv", "results.png"
SUMMARY_SCORES = ("heldout_loss", "frechet", "kid", "coverage")


# ---------------------------------------------------------------------------------------------
# Files


def write_report(out: Path, rows: list[CellResult], ab: AblationConfig, command: Optional[str] = None,
                 *, with_results_csv: bool = True) -> None:
    """The report files of the finished cells in `out` (results.csv only if `with_results_csv`)."""
    if not rows:
        return
    if with_results_csv:
        write_text_atomic(out / RESULTS_CSV, results_csv(rows))
    write_text_atomic(out / RESULTS_MD, markdown_report(rows, ab, command))
    write_text_atomic(out / SUMMARY_CSV, summary_csv(rows, ab))
    from .plot import plot_results

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
        raise UserError(f"{path} holds no result of this grid's cells; check grid.norms, "
                        "grid.groups, grid.channels_per_group, grid.batch_sizes and grid.seeds.")
    write_report(folder, rows, ab, command, with_results_csv=False)
    return rows


# ---------------------------------------------------------------------------------------------
# Summary


def summary_csv(rows: list[CellResult], ab: AblationConfig) -> str:
    """Per (row, batch size): finished seeds, diverged seeds, and each score's mean and std (the
    norm column names the row: the norm, with its grouping where the grid varies it)."""
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
    return csv_text(columns, table)


def _grid_pairs(ab: AblationConfig) -> list[tuple[str, int]]:
    return [(row, b) for row in grid_rows(ab) for b in ab.grid.batch_sizes]


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_report(rows: list[CellResult], ab: AblationConfig, command: Optional[str] = None) -> str:
    lines = _preamble(rows, ab)
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    if len(grid_seeds(ab)) == 1:
        by_cell = {(r.cell.row, r.batch_size): r for r in rows}
        lines += _pivot("Frechet distance (lower is better)", "frechet", "{:.3f}", by_cell, ab)
        lines += _pivot("Held-out denoising loss (lower is better)", "heldout_loss", "{:.4f}", by_cell, ab)
        lines += _pivot("Class coverage", "coverage", "{:.2f}", by_cell, ab, paper=False)
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
        f"channel_mult {m.channel_mult}, {grouping(m, ab)}; {ab.grid.images_seen} training images "
        f"per cell, {seed_text}; {ab.eval.num_images} samples "
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


def _pivot(title: str, key: str, spec: str, by_cell: dict, ab: AblationConfig, paper: bool = True) -> list[str]:
    """A norm x batch-size table of one seed's score; '-' where a cell has not finished."""
    paper = paper and varies_grouping(ab.grid)
    lines = [f"**{title}**", "", *_table_head(ab, spread=False, paper=paper)]
    for row, cell in row_cells(ab).items():
        values = [getattr(by_cell[row, b], key) if (row, b) in by_cell else None for b in ab.grid.batch_sizes]
        lines.append(f"| {row} | " + " | ".join(_value_text(v, spec) for v in values) + _paper_text(cell, paper) + " |")
    return lines + [""]


def _mean_table(title: str, key: str, spec: str, rows: list[CellResult], ab: AblationConfig,
                spread: bool = True) -> list[str]:
    """A norm x batch-size table of one score's mean ± std over seeds, with the spread of the means."""
    seeds = len(grid_seeds(ab))
    stats = seed_stats(rows, key)
    paper = spread and varies_grouping(ab.grid)  # the paper's error beside the scores, not the coverage
    lines = [f"**{title}** (mean ± std over {seeds} training seeds)", "", *_table_head(ab, spread, paper)]
    for row, cell in row_cells(ab).items():
        cells = [stats.get((row, b)) for b in ab.grid.batch_sizes]
        texts = [_stats_text(s, spec, seeds) for s in cells] + ([_spread_text(cells)] if spread else [])
        lines.append(f"| {row} | " + " | ".join(texts) + _paper_text(cell, paper) + " |")
    return lines + [""]


def _table_head(ab: AblationConfig, spread: bool, paper: bool) -> list[str]:
    sizes = ab.grid.batch_sizes
    extra = (" spread of means |" if spread else "") + (f" {PAPER_COLUMN} |" if paper else "")
    return ["| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |" + extra,
            "|---|" + "---:|" * (len(sizes) + spread + paper)]


def _paper_text(cell: Cell, paper: bool) -> str:
    if not paper:
        return ""
    error = paper_error(cell)
    return " | -" if error is None else f" | {error:.1f}"


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


def grouping(m, ab: Optional[AblationConfig] = None) -> str:
    """How the group norm groups channels, as the report's setup line says it."""
    if ab is not None and varies_grouping(ab.grid):
        return "group norm's grouping per row"
    return f"groups {m.groups}" if m.groups is not None else f"{m.channels_per_group} channels per group"
