"""The ablation's plot: each score's mean over seeds (error bars: one std), against the
per-device batch size (one line per norm) or, where the grid varies group norm's grouping,
against the grouping (one line per batch size), beside the paper's ImageNet error."""

from __future__ import annotations

import math
from pathlib import Path

from ..files import atomic_path
from .grid import AblationConfig, grid_rows, grid_seeds, row_cells, varies_grouping
from .results import CellResult, SeedStats, paper_error, seed_stats

SCORES = (("frechet", "Frechet distance (classifier features)", "Sample quality"),
          ("heldout_loss", "held-out denoising loss", "Held-out denoising loss"))


def plot_results(rows: list[CellResult], ab: AblationConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = varies_grouping(ab.grid)
    fig, axes = plt.subplots(1, 3 if grouped else 2, figsize=(16 if grouped else 11, 4.4))
    for ax, (key, ylabel, title) in zip(axes, SCORES):
        stats = seed_stats(rows, key)
        _by_grouping(ax, stats, ab) if grouped else _by_batch_size(ax, stats, ab)
        ax.set(ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    _log_scale(axes[0])
    floor = next((r.frechet_floor for r in rows if math.isfinite(r.frechet_floor)), None)
    if floor is not None:
        axes[0].axhline(floor, color="grey", linestyle="--", label="floor (real vs real)")
    axes[0].legend(fontsize=8)
    if grouped:
        _paper_panel(axes[2], ab)
    seeds = len(grid_seeds(ab))
    fig.suptitle(f"{'Group-count' if grouped else 'Norm'} ablation: {ab.grid.images_seen} training images per cell"
                 + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _errorbar(ax, xs: list, points: list[SeedStats], label: str) -> None:
    errors = [s.std or 0.0 for s in points]
    ax.errorbar(xs, [s.mean for s in points], yerr=errors if any(errors) else None, marker="o", capsize=3,
                label=label)


def _by_batch_size(ax, stats: dict[tuple[str, int], SeedStats], ab: AblationConfig) -> None:
    for row in grid_rows(ab):
        mine = [(b, stats[row, b]) for b in sorted(ab.grid.batch_sizes) if (row, b) in stats]
        if mine:
            _errorbar(ax, [b for b, _ in mine], [s for _, s in mine], row)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ab.grid.batch_sizes, [str(b) for b in ab.grid.batch_sizes])
    ax.set_xlabel("per-device batch size")


def _by_grouping(ax, stats: dict[tuple[str, int], SeedStats], ab: AblationConfig) -> None:
    rows = grid_rows(ab)
    for b in ab.grid.batch_sizes:
        mine = [(i, stats[row, b]) for i, row in enumerate(rows) if (row, b) in stats]
        if mine:
            _errorbar(ax, [i for i, _ in mine], [s for _, s in mine], f"batch {b}")
    _grouping_axis(ax, rows)


def _paper_panel(ax, ab: AblationConfig) -> None:
    """The paper's ImageNet top-1 error per grouping, where it is known."""
    rows = row_cells(ab)
    known = [(i, paper_error(cell)) for i, cell in enumerate(rows.values()) if paper_error(cell) is not None]
    ax.plot([i for i, _ in known], [e for _, e in known], "s", color="black")
    ax.set(ylabel="top-1 error (%)", title="Paper: ResNet-50 on ImageNet, 32 images/GPU")
    ax.grid(alpha=0.3)
    _grouping_axis(ax, list(rows))


def _grouping_axis(ax, rows: list[str]) -> None:
    ax.set_xticks(range(len(rows)), [row.removeprefix("group ") for row in rows], rotation=60, fontsize=8)
    ax.set_xlabel("groups per layer (G), or channels per group")


def _log_scale(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
