"""Running the ablation: train every unfinished cell, score it, and rebuild the report.

Each cell is scored with its exported EMA model in eval mode (batch norm uses its EMA'd running
statistics, as at sampling time) by a held-out denoising loss on fixed (image, t, noise) triples
and by the offline sample metric. A finished cell leaves `cells/<Cell.name>/result.json`
(written atomically, with the git commit of the code that made it), so an interrupted sweep
resumes at the first unfinished cell; the report is rebuilt from all finished cells after each one.
Several sweep processes can run on one folder side by side: each cell is trained by the one that
claims it first.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml

from ..config import Config, read_yaml
from ..data.dataset import digits_arrays
from ..errors import ConfigError, UserError
from ..evaluate.metric import Evaluator, Report, evaluator_for
from ..evaluate.scores import Scores
from ..files import file_lock, write_text_atomic
from ..runtime import cpu_threads
from .grid import AblationConfig, Cell, ablation_from_dict, cell_config, grid_cells, sweep_identity, validate_ablation
from .report import write_report
from .results import CellResult

SWEEP_FILE = "ablation.yaml"


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
    from ..diffusion.objective import denoising_loss

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


@dataclass
class Sweep:
    """What every cell of one sweep shares: its settings, scorer, floor, loss triples and code."""

    ab: AblationConfig
    evaluator: Evaluator
    floor: Scores
    triples: LossTriples
    command: Optional[str] = None
    commit: str = ""

    @property
    def out(self) -> Path:
        return Path(self.ab.output_dir)


def run_ablation(ab: AblationConfig, *, progress: bool = True, command: Optional[str] = None) -> Path:
    """Train and score every unfinished cell, then write the report (results.csv, results.md,
    summary.csv, results.png); returns the folder.

    `command`, the command line that ran the sweep, is quoted in results.md."""
    from accelerate import PartialState

    # like Accelerator, honour ACCELERATE_USE_CPU (the two-process CPU launch in the README)
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    validate_ablation(ab, state.num_processes)
    with cpu_threads(ab.base.runtime.cpu_threads):
        sweep = prepare_sweep(ab, command)  # the evaluator's failures come before the folder is made
        if state.is_main_process:
            claim_folder(Path(ab.output_dir), ab)
        _run_cells(sweep, state, progress)
    return Path(ab.output_dir)


def prepare_sweep(ab: AblationConfig, command: Optional[str] = None) -> Sweep:
    evaluator = evaluator_for(dataclasses.replace(ab.base, eval=ab.eval))
    floor = evaluator.floor(ab.eval.num_images, conditional=bool(ab.base.model.num_classes))
    triples = held_out_triples(ab.base, ab.loss_triples, ab.eval.seed)
    return Sweep(ab, evaluator, floor, triples, command, code_commit())


def code_commit() -> str:
    """The git commit of this package's code, "-dirty" when its tracked files differ from it,
    "" outside a git checkout: a result says which code made it. Read once per sweep, since
    the code that runs is the code imported at the start."""
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "."],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode or status.returncode:
        return ""
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _run_cells(sweep: Sweep, state, progress: bool) -> None:
    """Every unfinished cell in grid order; then the cells another sweep process held, each once
    that one lets it go: finished, or (if that process died) still to train."""
    from tqdm.auto import tqdm

    main = state.is_main_process
    bar = tqdm(grid_cells(sweep.ab), desc="ablation", unit="cell", disable=not (progress and main))
    say = bar.write if main else (lambda text: None)
    elsewhere = []
    for cell in bar:
        bar.set_postfix_str(cell.name)
        if _run_cell(sweep, cell, state, progress, say, wait=False) == ELSEWHERE:
            elsewhere.append(cell)
    if elsewhere:
        say(f"waiting for another sweep process on {sweep.out} to finish {len(elsewhere)} cell(s)")
    for cell in elsewhere:
        _run_cell(sweep, cell, state, progress, say, wait=True)
    if main:
        write_summary(sweep)


def _run_cell(sweep: Sweep, cell: Cell, state, progress: bool, say, *, wait: bool) -> str:
    """Train and score `cell` unless it is finished, or (without `wait`) another process holds it."""
    with cell_claim(sweep.out, cell, state, wait=wait) as decision:
        if decision == KEPT:
            say(f"{cell.name}: finished {'by another sweep process' if wait else 'earlier, kept'}")
        elif decision == ELSEWHERE:
            say(f"{cell.name}: another sweep process is training it; back to it at the end")
        else:
            result = train_and_score(sweep, cell, state.num_processes, progress)
            if state.is_main_process:
                write_text_atomic(result_path(sweep.out, cell), result.to_json())
                write_summary(sweep)
                say(_progress_line(cell, result, sweep.floor))
    state.wait_for_everyone()
    return decision


# ---------------------------------------------------------------------------------------------
# Side by side: several sweep processes on one folder share its cells


KEPT, ELSEWHERE, TRAIN = "kept", "elsewhere", "train"
CLAIMS_DIR = "claims"


@contextmanager
def cell_claim(out: Path, cell: Cell, state, *, wait: bool = False) -> Iterator[str]:
    """Whether this sweep trains `cell` (TRAIN), finds it finished (KEPT), or leaves it to another
    sweep process on the same folder (ELSEWHERE; with `wait`, it waits for that one instead); a
    trained cell's lock is held until its result is written. The lock is an OS file lock, so a
    killed sweep leaves no stale claim behind. The main process decides, and every rank of a
    multi-process sweep follows it. Side-by-side sweeps should share one grid: each writes the
    report of its own grid's cells."""
    lock = file_lock(out / CLAIMS_DIR / f"{cell.name}.lock", wait=wait) if state.is_main_process else nullcontext()
    with lock as held:
        decision = (KEPT if result_path(out, cell).is_file() else TRAIN if held else ELSEWHERE)
        yield _agreed(decision, state)


def _agreed(decision: str, state) -> str:
    if state.num_processes == 1:
        return decision
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([decision if state.is_main_process else None], from_process=0)[0]


def train_and_score(sweep: Sweep, cell: Cell, processes: int, progress: bool) -> CellResult:
    from ..train.loop import train

    cfg = cell_config(sweep.ab, cell, processes)
    started = time.perf_counter()
    train(cfg, progress=progress and not sweep.ab.quiet_training)
    trained = time.perf_counter()
    result = score_cell(cfg, sweep.evaluator, sweep.triples, sweep.ab.eval.num_images)
    return dataclasses.replace(result, train_seconds=round(trained - started, 1),
                               eval_seconds=round(time.perf_counter() - trained, 1), commit=sweep.commit,
                               groups=cell.groups, channels_per_group=cell.channels_per_group, processes=processes)


def _progress_line(cell: Cell, r: CellResult, floor: Scores) -> str:
    return (f"{cell.name}: Frechet {r.frechet:.3f} (floor {floor.frechet:.3f}), held-out loss {r.heldout_loss:.4f}, "
            f"{r.train_seconds:.0f}s + {r.eval_seconds:.0f}s")


def score_cell(cfg: Config, evaluator: Evaluator, triples: LossTriples, num_images: int) -> CellResult:
    """Load the cell's exported EMA model (eval mode) and score it; a diverged cell (non-finite
    held-out loss) gets NaN sample scores instead of stopping the sweep."""
    from ..sample.generate import every_class_once, generate
    from ..sample.model_folder import load_model

    model, run_cfg = load_model(cfg.train.output_dir, runtime=cfg.runtime)
    loss = held_out_loss(model, run_cfg, triples)
    t = run_cfg.train
    result = CellResult(norm=run_cfg.model.norm, batch_size=t.batch_size, steps=t.max_steps, lr=t.lr,
                        warmup_steps=t.warmup_steps, heldout_loss=loss,
                        ema_halflife_images=t.ema_halflife_images, seed=t.seed)
    if not math.isfinite(loss):
        return result
    images, labels = generate(model, every_class_once(run_cfg, num_images), progress=False)
    return with_sample_scores(result, evaluator.report(images, labels, made_by=f"the model {cfg.train.output_dir}"))


def with_sample_scores(result: CellResult, report: Report) -> CellResult:
    s, floor = report.samples, report.floor
    return dataclasses.replace(result, frechet=s.frechet, frechet_floor=floor.frechet, frechet_ratio=report.frechet_ratio,
                               kid=s.kid, kid_floor=floor.kid, coverage=s.coverage, kl_uniform=s.kl_uniform,
                               accuracy=s.accuracy)


# ---------------------------------------------------------------------------------------------
# The sweep's folder


def result_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.name / "result.json"


def finished_results(out: Path, ab: AblationConfig) -> list[CellResult]:
    """The results of the grid's finished cells, in grid order."""
    paths = (result_path(out, cell) for cell in grid_cells(ab))
    return [CellResult.from_json(p.read_text()) for p in paths if p.is_file()]


def write_summary(sweep: Sweep) -> None:
    """The report of every finished cell; one process at a time, so the last written is the fullest."""
    with file_lock(sweep.out / CLAIMS_DIR / "report.lock"):
        write_report(sweep.out, finished_results(sweep.out, sweep.ab), sweep.ab, sweep.command)


def claim_folder(out: Path, ab: AblationConfig) -> None:
    """Record the sweep's settings; refuse a folder whose finished cells used other settings."""
    saved = out / SWEEP_FILE
    if saved.is_file() and _saved_identity(saved) != sweep_identity(ab):
        raise UserError(
            f"{out} holds a sweep run with other settings (see {saved}); use a new output_dir, "
            "or the same settings to resume it (only the lists of cells may change: grid.norms, grid.groups, "
            "grid.channels_per_group, grid.batch_sizes and grid.seeds)."
        )
    write_text_atomic(saved, yaml.safe_dump(asdict(ab), sort_keys=False))  # makes `out`, or leaves no trace


def _saved_identity(path: Path) -> Optional[dict[str, Any]]:
    try:
        return sweep_identity(ablation_from_dict(read_yaml(path, saved=True), saved=True))  # UTF-8, no aliases
    except ConfigError:
        return None
