"""The ablation's results: one row per finished cell, and the CSV, markdown table and plot
made from them.

The CSV has one column per `CellResult` field, in field order; a NaN score marks a diverged
cell ("diverged" in the markdown), an empty one a score the features cannot give (no classes).
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

from .ablation_grid import AblationConfig
from .files import atomic_path, write_text_atomic
from .metrics import Scores

NAN = math.nan


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
    return int(text) if kind is int else float(text)


# ---------------------------------------------------------------------------------------------
# Files


def results_csv(rows: list[CellResult]) -> str:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[f.name for f in dataclasses.fields(CellResult)])
    writer.writeheader()
    writer.writerows(dataclasses.asdict(row) for row in rows)
    return table.getvalue()


def read_results_csv(path: Path) -> list[CellResult]:
    with open(path, newline="") as f:
        return [CellResult.from_csv_row(row) for row in csv.DictReader(f)]


def write_report(out: Path, rows: list[CellResult], ab: AblationConfig, floor: Scores,
                 command: Optional[str] = None) -> None:
    """results.csv, results.md and results.png of the finished cells in `out`."""
    if not rows:
        return
    write_text_atomic(out / "results.csv", results_csv(rows))
    write_text_atomic(out / "results.md", markdown_table(rows, ab, floor, command))
    plot_results(rows, ab, floor, out / "results.png")


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_table(rows: list[CellResult], ab: AblationConfig, floor: Scores, command: Optional[str] = None) -> str:
    lines = _markdown_preamble(ab, floor)
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    by_cell = {(r.norm, r.batch_size): r for r in rows}
    lines += _pivot("Frechet distance (lower is better)", "frechet", "{:.3f}", by_cell, ab)
    lines += _pivot("Held-out denoising loss (lower is better)", "heldout_loss", "{:.4f}", by_cell, ab)
    lines += _pivot("Class coverage", "coverage", "{:.2f}", by_cell, ab)
    return "\n".join(lines)


def _markdown_preamble(ab: AblationConfig, floor: Scores) -> list[str]:
    m, base = ab.base.model, ab.base
    return [
        "# Normalization ablation",
        "",
        f"Digits at {m.image_size}x{m.image_size}, base_channels {m.base_channels}, "
        f"channel_mult {m.channel_mult}, groups {m.groups}; {ab.grid.images_seen} training images "
        f"per cell, seed {base.train.seed}; {ab.eval.num_samples} samples "
        f"({base.sample.scheduler}, {base.sample.num_inference_steps} steps) per cell.",
        "",
        f"Floor (the same count of real training images vs the held-out split): Frechet distance "
        f"{floor.frechet:.3f}, KID x 1e3 {1e3 * floor.kid:.2f}.",
        "",
    ]


def _pivot(title: str, key: str, spec: str, by_cell: dict, ab: AblationConfig) -> list[str]:
    """A norm x batch-size table of one score; '-' where a cell has not finished."""
    sizes = ab.grid.batch_sizes
    lines = [f"**{title}**", "", "| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for norm in ab.grid.norms:
        values = [getattr(by_cell[norm, b], key) if (norm, b) in by_cell else None for b in sizes]
        lines.append(f"| {norm} | " + " | ".join(_cell_text(v, spec) for v in values) + " |")
    return lines + [""]


def _cell_text(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    return "diverged" if math.isnan(value) else spec.format(value)


# ---------------------------------------------------------------------------------------------
# Plot


def plot_results(rows: list[CellResult], ab: AblationConfig, floor: Scores, path: Path) -> None:
    """Frechet distance and held-out loss against the batch size, one line per norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for norm in ab.grid.norms:
        mine = sorted((r for r in rows if r.norm == norm), key=lambda r: r.batch_size)
        if mine:
            sizes = [r.batch_size for r in mine]
            ax_fd.plot(sizes, [r.frechet for r in mine], marker="o", label=norm)
            ax_loss.plot(sizes, [r.heldout_loss for r in mine], marker="o", label=norm)
    ax_fd.axhline(floor.frechet, color="grey", linestyle="--", label="floor (real vs real)")
    _style_axes(ax_fd, ax_loss, ab.grid.batch_sizes)
    fig.suptitle(f"Norm ablation: {ab.grid.images_seen} training images per cell")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


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
