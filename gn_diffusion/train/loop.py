"""The training loop: accelerate (DDP, mixed precision, gradient accumulation), AdamW with
warm-up, EMA, sample grids, atomic checkpoints and exact resume.

Exactness: the model is built right after seeding; every random draw of a step comes from a
generator seeded by (seed, micro-batch, rank); batches come from `EpochBatches`, a pure
function of (seed, epoch, position); the learning rate is a pure function of the step; and
dropout's global RNG state is saved in every checkpoint by accelerate. So stopping at step k and
resuming gives the same weights as never stopping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config
from ..data.dataset import build_dataset, collate_batch
from ..data.sources import DataListing
from ..diffusion.seeding import seeded_generator
from ..errors import UserError
from ..files import HeldLock, check_writable
from ..images import save_grid
from ..images import grid_upscale
from ..memory import lower_on_oom
from ..model.unet import GNUNet, build_unet
from ..run_folder.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..run_folder.claim import check_output_path, checked_resume_point, claim_output_dir, flat_config, hold_output_dir
from ..run_folder.layout import RunLayout
from ..run_folder.weights import init_weights_from
from ..runtime import (check_runtime, compile_failure, compile_model, execution_record, memory_format, resume_note,
                       torch_settings)
from ..sample.checks import check_images_fit, check_sampling
from ..sample.generate import every_class_once, generate
from ..sample.model_folder import export_model
from .ema import EMA
from .step import TrainStep, check_fused_adamw, learning_rate, make_optimizer
from .tracking import check_tracker, log_grid, log_with, start_trackers


def batches_per_epoch(num_items: int, batch_size: int, world: int) -> int:
    """Whole global batches in one pass over the data; a UserError if not even one fits."""
    per_epoch = num_items // (batch_size * world)
    if per_epoch == 0:
        raise UserError(f"the data set has {num_items} images, fewer than one batch of {batch_size} x "
                        f"{world} process(es); lower train.batch_size.")
    return per_epoch


class EpochBatches(Sampler[list[int]]):
    """Endless index batches of one rank, starting at global micro-batch `start`.

    Epoch e shuffles all indices with a generator seeded by (seed, e); its b-th global batch is
    positions [b*B*W, (b+1)*B*W) of that order and rank r takes the r-th B of them.
    """

    def __init__(self, num_items: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        self.batch_size, self.world, self.rank, self.seed, self.start = batch_size, world, rank, seed, start
        self.num_items = num_items
        self.per_epoch = batches_per_epoch(num_items, batch_size, world)

    def __iter__(self):
        micro, order, order_epoch = self.start, None, -1
        while True:
            epoch, b = divmod(micro, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = torch.randperm(self.num_items, generator=seeded_generator(self.seed, epoch)), epoch
            first = (b * self.world + self.rank) * self.batch_size
            yield order[first: first + self.batch_size].tolist()
            micro += 1


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = cfg.train
    layout = RunLayout(t.output_dir)
    project = ProjectConfiguration(project_dir=str(layout.root), logging_dir=str(layout.logs))
    try:
        return Accelerator(
            mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
            cpu=cfg.runtime.cpu, log_with=log_with(cfg), project_config=project,
        )
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"train.mixed_precision={t.mixed_precision} is not available here ({exc}); "
                        "use train.mixed_precision=no or bf16.") from None


def save_training_grid(ema: EMA, cfg: Config, path: Path, num_images: int) -> Path:
    images, _ = generate(ema.model, every_class_once(cfg, num_images), progress=False)
    nrow = cfg.model.num_classes or None
    return save_grid(images, path, nrow=nrow, upscale=grid_upscale(cfg.model.image_size))


class Throughput:
    """Images per second over steady-state training steps: grids, checkpoints and each session's
    first step (kernel warm-up and compilation) are excluded."""

    def __init__(self):
        self.images, self.seconds, self._start = 0, 0.0, 0.0

    def start(self):
        self._start = time.perf_counter()

    def stop(self, images: int, warm: bool = True):
        if warm:
            self.seconds += time.perf_counter() - self._start
            self.images += images

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@dataclass
class CheckedRun:
    """A checked run: its config, folder, accelerator, model, data and the checkpoint to resume
    from, and the folder's lock (the main process's). Making it writes nothing but the lock."""

    cfg: Config
    layout: RunLayout
    accelerator: Any
    model: GNUNet
    dataset: Dataset
    resume_from: Optional[Path]
    listing: Optional[DataListing] = None
    lock: Optional[HeldLock] = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def check_run(cfg: Config) -> CheckedRun:
    """Every check a run can fail (hardware, runtime settings, model, data, batch against data,
    output folder and checkpoint) before anything is written; the folder's lock is taken before
    the folder is read, and given back untouched when a check fails after it."""
    from accelerate.utils import set_seed

    check_tracker(cfg)
    check_output_path(cfg)
    accelerator = make_accelerator(cfg)
    check_runtime(cfg.runtime, accelerator.device)
    check_fused_adamw(accelerator.device)
    set_seed(cfg.train.seed)  # before the model is built: same seed, same initial weights
    with lower_on_oom("building the model", "model.base_channels", "model.channel_mult", "model.num_res_blocks"):
        model = build_unet(cfg.model, cfg.runtime)
    if cfg.train.init_from:  # before the EMA copy is made, so it starts from these weights too
        init_weights_from(model, cfg.train.init_from)
    with lower_on_oom("loading the data", "model.image_size"):  # the digits are upsampled in memory
        dataset = build_dataset(cfg)
    batches_per_epoch(len(dataset), cfg.train.batch_size, accelerator.num_processes)
    check_sampling(cfg)  # the grids' settings: a bad step count fails now, not after training
    check_images_fit(cfg, "train.sample_num_images")  # the grids made every train.sample_every steps
    check_writable(cfg.train.output_dir)
    listing = dataset.listing()
    lock = hold_output_dir(Path(cfg.train.output_dir), accelerator)
    try:
        resume_from = checked_resume_point(cfg, model, accelerator.num_processes, listing)
    except BaseException:
        if lock is not None:
            lock.release(undo=True)
        raise
    return CheckedRun(cfg, RunLayout(cfg.train.output_dir), accelerator, model, dataset, resume_from, listing, lock)


def train(cfg: Config, *, progress: bool = True) -> Path:
    """Run (or resume, per train.resume) a training run; returns the output folder. Threads and
    determinism follow cfg.runtime during the call and are put back after it."""
    with torch_settings(cfg.runtime):  # before check_run: the deterministic cuBLAS setting precedes CUDA work
        checked = check_run(cfg)
        with lower_on_oom("training", "train.batch_size", "model.image_size", "model.base_channels"):
            return run(checked, progress=progress)


@dataclass
class Session:
    """A run in progress: the prepared model, its step function, the data and the step count."""

    train_step: TrainStep
    batches: Iterator[dict]
    steps_done: int


def start_session(checked: CheckedRun) -> Session:
    """Prepare model and optimizer, restore a checkpoint, and open the data at the right batch."""
    cfg, accelerator, t = checked.cfg, checked.accelerator, checked.cfg.train
    fmt = memory_format(cfg.runtime)
    model = checked.model.to(memory_format=fmt)
    optimizer = make_optimizer(model, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(accelerator.unwrap_model(model), t.ema_halflife_images, t.ema_rampup,
              t.images_per_step(accelerator.num_processes))
    done, record = load_checkpoint(accelerator, checked.resume_from, ema) if checked.resume_from else (0, None)
    note = resume_note(record, execution_record(cfg.runtime, accelerator.device))
    if note:
        accelerator.print(note)
    batches = EpochBatches(len(checked.dataset), t.batch_size, accelerator.num_processes, accelerator.process_index,
                           t.seed, start=done * t.gradient_accumulation_steps)
    # A dedicated generator: a new loader iterator must not draw from the global RNG (dropout's).
    loader = DataLoader(checked.dataset, batch_sampler=batches, num_workers=cfg.data.num_workers,
                        collate_fn=collate_batch, pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator())
    step = TrainStep(accelerator, model, compile_model(model, cfg.runtime), optimizer, ema, cfg, fmt)
    return Session(step, iter(loader), done)


def run(checked: CheckedRun, *, progress: bool = True) -> Path:
    """Claim the run folder, then train, checkpoint, sample and export as the config says; the
    folder's lock is let go at the end, however the run ends."""
    try:
        return run_session(checked, progress)
    finally:
        checked.release()


def run_session(checked: CheckedRun, progress: bool) -> Path:
    from tqdm.auto import tqdm

    cfg, layout, accelerator = checked.cfg, checked.layout, checked.accelerator
    t = cfg.train
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        claim_output_dir(cfg, checked.listing, fresh=checked.resume_from is None)
    accelerator.wait_for_everyone()
    session = start_session(checked)
    train_step, step = session.train_step, session.steps_done
    ema = train_step.ema
    effective = t.images_per_step(accelerator.num_processes)
    accelerator.print(f"effective batch {effective} = {t.batch_size} per device x {accelerator.num_processes} "
                      f"process(es) x {t.gradient_accumulation_steps} accumulation step(s); {len(checked.dataset)} images; "
                      + (f"resuming from {checked.resume_from}" if checked.resume_from else "starting at step 0"))
    start_trackers(accelerator, cfg, {k: str(v) for k, v in flat_config(cfg).items()})

    bar = tqdm(total=t.max_steps, initial=step, desc="training", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    speed, window = Throughput(), []
    try:
        while step < t.max_steps:
            speed.start()
            window += first_step(session, step, cfg) if step == session.steps_done else train_step(session.batches, step)
            step += 1
            speed.stop(effective, warm=step > session.steps_done + 1)
            bar.update(1)

            logs, saves = step % t.log_every == 0 or step == t.max_steps, step % t.checkpoint_every == 0 or step == t.max_steps
            skipping = check_skips(session, layout, step, t.max_bad_steps) if logs or saves else False
            if logs:
                mean_loss = accelerator.reduce(finite_mean(window), "mean").item()
                window.clear()
                lr = learning_rate(cfg, step - 1)
                skipped = train_step.guard.counts()[1]
                accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": speed.rate,
                                 "train/skipped_steps": skipped}, step=step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed.rate:.0f}", skipped=skipped)
            if saves and skipping:
                accelerator.print(f"step {step}: inside a run of skipped steps; no checkpoint written, none removed")
            elif saves:
                check_weights_finite(session, layout, step)
                check_writable(layout.checkpoints)
                save_checkpoint(accelerator, layout.root, step, ema, t.keep_checkpoints,
                                execution_record(cfg.runtime, accelerator.device))
            if step % t.sample_every == 0 and step != t.max_steps and accelerator.is_main_process:
                log_grid(accelerator, save_training_grid(ema, cfg, layout.grid(step), t.sample_num_images), step)
    finally:
        bar.close()  # an error line starts on a line of its own

    check_weights_finite(session, layout, step)
    if accelerator.is_main_process:
        export_model(ema.model, cfg, layout.model)
        grid = save_training_grid(ema, cfg, layout.grid(), cfg.sample.num_images)
        log_grid(accelerator, grid, step)
        accelerator.print(f"model: {layout.model}; samples: {grid}; {speed.rate:.1f} images/s over "
                          f"{speed.seconds:.0f} s of steady-state training steps")
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training: it would end the process group a sweep still needs
        tracker.finish()
    return layout.root


def finite_mean(losses: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the finite losses (skipped steps' are not), 0 when there are none."""
    values = torch.stack(losses)
    finite = torch.isfinite(values)
    return torch.where(finite, values, 0).sum() / finite.sum().clamp(min=1)


def check_skips(session: Session, layout: RunLayout, step: int, limit: int) -> bool:
    """Whether the latest steps were skipped (a host read, on log and checkpoint steps); a
    UserError when more than `limit` were, in a row."""
    in_a_row, _ = session.train_step.guard.counts()
    if in_a_row > limit:
        good = latest_checkpoint(layout.root)
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written"
        raise UserError(f"the {in_a_row} steps up to step {step} had a non-finite loss or gradient norm (more than "
                        f"train.max_bad_steps={limit} in a row); {kept}; lower train.lr or set train.grad_clip and "
                        "resume from it.")
    return in_a_row > 0


def check_weights_finite(session: Session, layout: RunLayout, step: int) -> None:
    """Refuse to write non-finite weights: the checkpoints and the model already there stay as
    they are (a read-back, on checkpoint steps only)."""
    tensors = [*session.train_step.params, *session.train_step.ema.state_dict().values()]
    finite = torch.stack([torch.isfinite(x).all() for x in tensors if x.is_floating_point()]).all()
    if bool(finite):
        return
    good = latest_checkpoint(layout.root)
    kept = f"the last good checkpoint, {good}, is kept" if good else "no checkpoint was written"
    raise UserError(f"the weights became non-finite by step {step}; {kept}; lower train.lr or set train.grad_clip "
                    "and resume.")


def first_step(session: Session, step: int, cfg: Config) -> list[torch.Tensor]:
    """The first step of a session: it warms (and under runtime.compile, compiles) the kernels,
    so it is timed apart and reported, and a compile failure becomes one sentence."""
    started = time.perf_counter()
    try:
        losses = session.train_step(session.batches, step)
    except Exception as exc:
        failure = compile_failure(exc) if cfg.runtime.compile != "none" else None
        if failure is None:
            raise
        raise failure from None
    if cfg.runtime.compile != "none":
        session.train_step.accelerator.print(f"runtime.compile={cfg.runtime.compile}: first step (compile) took "
                                       f"{time.perf_counter() - started:.1f} s")
    return losses
