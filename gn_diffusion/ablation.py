"""The normalization ablation: norm kinds x per-device batch sizes, scored honestly.

Every cell trains on the same number of images with the same seeds; learning-rate warm-up and
the EMA half-life are kept the same in images, so cells differ only in the norm, the batch size
and the number of optimizer steps that batch size implies. Each cell is scored with its exported
EMA model in eval mode (batch norm uses its EMA'd running statistics, as at sampling time) by a
held-out denoising loss on fixed (image, t, noise) triples and by the offline sample metric.

A finished cell leaves `cells/<norm>-b<batch>/result.json` (written atomically), so an
interrupted sweep resumes at the first unfinished cell; the CSV, markdown table and plot are
rebuilt from all finished cells after each one.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from .config import Config, apply_overrides, build_typed, config_from_dict, read_yaml
from .data import digits_arrays
from .errors import ConfigError, UserError
from .files import write_text_atomic
from .evaluation import (
    EvalSettings, Evaluator, Scores, cpu_threads, digits_evaluator, sample_and_report, validate_settings,
)
from .norms import available_norms

LR_SCALING = ("none", "sqrt", "linear")
SWEEP_FILE = "ablation.yaml"


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class GridConfig:
    norms: list[str] = field(default_factory=lambda: ["group", "batch", "layer", "instance", "none"])
    batch_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])  # per device
    images_seen: int = 32000  # training images per cell: max_steps = images_seen / images per step
    reference_batch_size: int = 32  # base.train's lr, warm-up and EMA decay are meant at this batch
    lr_scaling: str = "none"  # none | sqrt | linear: the lr at batch B is lr x (B / reference)^p


@dataclass
class AblationConfig:
    output_dir: str = "runs/ablation_norms"
    base: Config = field(default_factory=Config)  # the training run every cell starts from
    grid: GridConfig = field(default_factory=GridConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    loss_triples: int = 512  # held-out (image, t, noise) triples of the denoising loss
    quiet_training: bool = True  # hide each cell's inner training progress bar
    threads: int = 0  # torch CPU threads during the sweep (0: torch's default); see cpu_threads


def load_ablation_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AblationConfig:
    """Read an ablation YAML (sections output_dir, base, grid, eval), apply overrides, validate."""
    ab = build_typed(AblationConfig, apply_overrides(read_yaml(Path(path)), overrides), prefix="")
    validate_ablation(ab, processes=1)
    return ab


def validate_ablation(ab: AblationConfig, processes: int) -> None:
    """Judge the grid and build (hence validate) every cell's training config before any runs."""
    g = ab.grid
    unknown = [n for n in g.norms if n not in available_norms()]
    if not g.norms or unknown:
        raise ConfigError(f"'grid.norms' {unknown or '[]'} must name norm kinds from {', '.join(available_norms())}.")
    if not g.batch_sizes or any(b <= 0 for b in g.batch_sizes):
        raise ConfigError(f"'grid.batch_sizes' must be a non-empty list of positive integers, got {g.batch_sizes}.")
    for key, values in (("norms", g.norms), ("batch_sizes", g.batch_sizes)):
        if len(set(values)) != len(values):
            raise ConfigError(f"'grid.{key}' lists a value twice: {values}.")
    if g.lr_scaling not in LR_SCALING:
        raise ConfigError(f"'grid.lr_scaling' is {g.lr_scaling!r}; choose one of {', '.join(LR_SCALING)}.")
    if g.reference_batch_size <= 0 or ab.loss_triples <= 0:
        raise ConfigError("'grid.reference_batch_size' and 'loss_triples' must be positive.")
    if ab.threads < 0:
        raise ConfigError(f"'threads' must be 0 (torch's default) or a positive count, got {ab.threads}.")
    if ab.base.data.dataset != "digits":
        raise ConfigError("the ablation scores against the held-out digits; set base.data.dataset=digits.")
    validate_settings(ab.eval)
    for norm in g.norms:
        for batch_size in g.batch_sizes:
            cell_config(ab, norm, batch_size, processes)


def cell_name(norm: str, batch_size: int) -> str:
    return f"{norm}-b{batch_size}"


def cell_config(ab: AblationConfig, norm: str, batch_size: int, processes: int) -> Config:
    """The training config of one cell: same images seen, same seeds, schedules kept in images."""
    cfg = copy.deepcopy(ab.base)
    t = cfg.train
    per_step = batch_size * t.gradient_accumulation_steps * processes
    if ab.grid.images_seen % per_step:
        raise ConfigError(
            f"'grid.images_seen' {ab.grid.images_seen} is not a multiple of the {per_step} images per step "
            f"of batch size {batch_size}; use a multiple of every batch size x accumulation x processes."
        )
    ratio = per_step / ab.grid.reference_batch_size
    cfg.model.norm = norm
    t.batch_size = batch_size
    t.max_steps = ab.grid.images_seen // per_step
    t.lr *= ratio ** {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[ab.grid.lr_scaling]
    t.warmup_steps = round(t.warmup_steps / ratio)
    t.ema_decay = t.ema_decay**ratio  # the same EMA half-life, counted in images
    t.output_dir = str(Path(ab.output_dir) / "cells" / cell_name(norm, batch_size))
    t.resume = "auto"  # a cell killed mid-training continues from its last checkpoint
    return config_from_dict(cfg.to_dict())


def sweep_identity(ab: AblationConfig) -> dict[str, Any]:
    """The settings finished cells depend on: everything but the list of cells and the folder."""
    raw = asdict(ab)
    raw.pop("output_dir")
    raw["grid"] = {k: v for k, v in raw["grid"].items() if k not in ("norms", "batch_sizes")}
    raw.pop("quiet_training")
    raw.pop("threads")
    return raw


# ---------------------------------------------------------------------------------------------
# Held-out denoising loss on fixed triples


@dataclass
class LossTriples:
    images: torch.Tensor
    labels: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


def held_out_triples(cfg: Config, count: int, seed: int) -> LossTriples:
    """`count` (held-out image, t, noise) triples from a fixed seed: identical in every cell."""
    images, labels = digits_arrays("test", cfg.model.image_size)
    pick = torch.arange(count) % len(images)
    g = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, cfg.diffusion.num_train_timesteps, (count,), generator=g)
    noise = torch.randn((count, *images.shape[1:]), generator=g)
    return LossTriples(images[pick], labels[pick], timesteps, noise)


@torch.no_grad()
def held_out_loss(model, cfg: Config, triples: LossTriples, batch_size: int = 256) -> float:
    """Mean per-sample denoising loss of `model` (in eval mode) on the fixed triples."""
    from .diffusion import denoising_loss

    model.eval()
    total = 0.0
    for i in range(0, len(triples.images), batch_size):
        part = slice(i, i + batch_size)
        labels = triples.labels[part] if cfg.model.num_classes else None
        loss = denoising_loss(model, triples.images[part], triples.timesteps[part], triples.noise[part],
                              labels, cfg.diffusion)
        total += float(loss.double().sum())
    return total / len(triples.images)


# ---------------------------------------------------------------------------------------------
# The sweep


def run_ablation(ab: AblationConfig, *, progress: bool = True, command: Optional[str] = None) -> Path:
    """Train and score every unfinished cell, then write results.{csv,md,png}; returns the folder.

    `command`, the command line that ran the sweep, is quoted in results.md."""
    from accelerate import PartialState

    state = PartialState()
    validate_ablation(ab, state.num_processes)
    with cpu_threads(ab.threads):
        return _run_cells(ab, state, progress, command)


def _run_cells(ab: AblationConfig, state, progress: bool, command: Optional[str]) -> Path:
    from tqdm.auto import tqdm

    from .training import train

    out = Path(ab.output_dir)
    if state.is_main_process:
        claim_folder(out, ab)
    cells = [(n, b) for n in ab.grid.norms for b in ab.grid.batch_sizes]
    todo = [c for c in cells if not result_path(out, *c).is_file()]  # decided once, alike on every rank
    evaluator = digits_evaluator(ab.base.model.image_size, ab.eval)
    floor = evaluator.floor(ab.eval.num_samples, conditional=bool(ab.base.model.num_classes))
    triples = held_out_triples(ab.base, ab.loss_triples, ab.eval.seed)
    bar = tqdm(cells, desc="ablation", unit="cell", disable=not (progress and state.is_main_process))
    for norm, batch_size in bar:
        name = cell_name(norm, batch_size)
        bar.set_postfix_str(name)
        if (norm, batch_size) not in todo:
            bar.write(f"{name}: finished earlier, kept")
            continue
        cfg = cell_config(ab, norm, batch_size, state.num_processes)
        started = time.perf_counter()
        train(cfg, progress=progress and not ab.quiet_training)
        trained = time.perf_counter()
        row = score_cell(cfg, evaluator, triples, ab.eval.num_samples)
        row.update(train_seconds=round(trained - started, 1), eval_seconds=round(time.perf_counter() - trained, 1))
        if state.is_main_process:
            write_json_atomic(result_path(out, norm, batch_size), row)
            write_summary(out, ab, floor, command)
            bar.write(f"{name}: Frechet {row['frechet']:.3f} (floor {floor.frechet:.3f}), "
                      f"held-out loss {row['heldout_loss']:.4f}, {row['train_seconds']:.0f}s + {row['eval_seconds']:.0f}s")
        state.wait_for_everyone()
    if state.is_main_process:
        write_summary(out, ab, floor, command)
    return out


def score_cell(cfg: Config, evaluator: Evaluator, triples: LossTriples, num_samples: int) -> dict[str, Any]:
    """Load the cell's exported EMA model (eval mode) and score it; a diverged cell (non-finite
    held-out loss) gets NaN sample scores instead of stopping the sweep."""
    from .sampling import load_model

    model, run_cfg = load_model(cfg.train.output_dir)
    loss = held_out_loss(model, run_cfg, triples)
    t = run_cfg.train
    row = {"norm": run_cfg.model.norm, "batch_size": t.batch_size, "steps": t.max_steps, "lr": t.lr,
           "warmup_steps": t.warmup_steps, "ema_decay": t.ema_decay, "heldout_loss": loss}
    scores = dict.fromkeys(("frechet", "frechet_floor", "frechet_ratio", "kid", "kid_floor", "coverage",
                            "kl_uniform", "accuracy"), math.nan)
    if math.isfinite(loss):
        report = sample_and_report(model, run_cfg, evaluator, num_samples, progress=False)
        s, floor = report.samples, report.floor
        scores = {"frechet": s.frechet, "frechet_floor": floor.frechet, "frechet_ratio": report.frechet_ratio,
                  "kid": s.kid, "kid_floor": floor.kid, "coverage": s.coverage, "kl_uniform": s.kl_uniform,
                  "accuracy": s.accuracy}
    return {**row, **scores}


def result_path(out: Path, norm: str, batch_size: int) -> Path:
    return out / "cells" / cell_name(norm, batch_size) / "result.json"


def claim_folder(out: Path, ab: AblationConfig) -> None:
    """Record the sweep's settings; refuse a folder whose finished cells used other settings."""
    saved = out / SWEEP_FILE
    identity = sweep_identity(ab)
    if saved.is_file():
        previous = yaml.safe_load(saved.read_text()) or {}
        if sweep_identity_from_raw(previous) != identity:
            raise UserError(
                f"{out} holds a sweep run with other settings (see {saved}); use a new output_dir, "
                "or the same settings to resume it (only grid.norms and grid.batch_sizes may change)."
            )
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, yaml.safe_dump(asdict(ab), sort_keys=False))


def sweep_identity_from_raw(raw: dict[str, Any]) -> Optional[dict[str, Any]]:
    try:
        return sweep_identity(build_typed(AblationConfig, raw, prefix=""))
    except ConfigError:
        return None


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


# ---------------------------------------------------------------------------------------------
# Results: CSV, markdown, plot


def finished_rows(out: Path, ab: AblationConfig) -> list[dict[str, Any]]:
    rows = []
    for norm in ab.grid.norms:
        for batch_size in ab.grid.batch_sizes:
            path = result_path(out, norm, batch_size)
            if path.is_file():
                rows.append(json.loads(path.read_text()))
    return rows


def write_summary(out: Path, ab: AblationConfig, floor: Scores, command: Optional[str] = None) -> None:
    rows = finished_rows(out, ab)
    if not rows:
        return
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", table.getvalue())
    write_text_atomic(out / "results.md", markdown_table(rows, ab, floor, command))
    plot_results(rows, ab, floor, out / "results.png")


def markdown_table(rows: list[dict[str, Any]], ab: AblationConfig, floor: Scores, command: Optional[str] = None) -> str:
    by_cell = {(r["norm"], r["batch_size"]): r for r in rows}
    sizes = ab.grid.batch_sizes

    def pivot(title: str, key: str, spec: str) -> list[str]:
        lines = [f"**{title}**", "", "| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |",
                 "|---|" + "---:|" * len(sizes)]
        for norm in ab.grid.norms:
            values = [by_cell.get((norm, b), {}).get(key) for b in sizes]
            lines.append(f"| {norm} | " + " | ".join(_cell_text(v, spec) for v in values) + " |")
        return lines + [""]

    base = ab.base
    lines = [
        "# Normalization ablation",
        "",
        f"Digits at {base.model.image_size}x{base.model.image_size}, base_channels {base.model.base_channels}, "
        f"channel_mult {base.model.channel_mult}, groups {base.model.groups}; {ab.grid.images_seen} training images "
        f"per cell, seed {base.train.seed}; {ab.eval.num_samples} samples "
        f"({base.sample.scheduler}, {base.sample.num_inference_steps} steps) per cell.",
        "",
        f"Floor (the same count of real training images vs the held-out split): Frechet distance "
        f"{floor.frechet:.3f}, KID x 1e3 {1e3 * floor.kid:.2f}.",
        "",
    ]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    lines += pivot("Frechet distance (lower is better)", "frechet", "{:.3f}")
    lines += pivot("Held-out denoising loss (lower is better)", "heldout_loss", "{:.4f}")
    lines += pivot("Class coverage", "coverage", "{:.2f}")
    return "\n".join(lines)


def _cell_text(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    return "diverged" if math.isnan(value) else spec.format(value)


def plot_results(rows: list[dict[str, Any]], ab: AblationConfig, floor: Scores, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, (ax_fd, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for norm in ab.grid.norms:
        mine = sorted((r for r in rows if r["norm"] == norm), key=lambda r: r["batch_size"])
        if not mine:
            continue
        sizes = [r["batch_size"] for r in mine]
        ax_fd.plot(sizes, [r["frechet"] for r in mine], marker="o", label=norm)
        ax_loss.plot(sizes, [r["heldout_loss"] for r in mine], marker="o", label=norm)
    ax_fd.axhline(floor.frechet, color="grey", linestyle="--", label="floor (real vs real)")
    ax_fd.set(yscale="log", ylabel="Frechet distance (classifier features)", title="Sample quality")
    ax_fd.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_fd.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax_loss.set(ylabel="held-out denoising loss", title="Held-out denoising loss")
    for ax in (ax_fd, ax_loss):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ab.grid.batch_sizes, [str(b) for b in ab.grid.batch_sizes])
        ax.set_xlabel("per-device batch size")
        ax.grid(alpha=0.3)
    ax_fd.legend(fontsize=8)
    fig.suptitle(f"Norm ablation: {ab.grid.images_seen} training images per cell")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
