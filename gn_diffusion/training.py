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
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .data import build_dataset
from .diffusion import seeded_generator, training_loss
from .ema import EMA
from .errors import UserError
from .images import save_grid
from .model_io import export_model
from .threads import set_cpu_threads
from .run_dir import claim_output_dir, flat_config, plan_output_dir
from .unet import build_unet


class EpochBatches(Sampler[list[int]]):
    """Endless index batches of one rank, starting at global micro-batch `start`.

    Epoch e shuffles all indices with a generator seeded by (seed, e); its b-th global batch is
    positions [b*B*W, (b+1)*B*W) of that order and rank r takes the r-th B of them.
    """

    def __init__(self, num_items: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        self.batch_size, self.world, self.rank, self.seed, self.start = batch_size, world, rank, seed, start
        self.num_items = num_items
        self.per_epoch = num_items // (batch_size * world)
        if self.per_epoch == 0:
            raise UserError(f"the data set has {num_items} images, fewer than one batch of {batch_size} x "
                            f"{world} process(es); lower train.batch_size.")

    def __iter__(self):
        micro, order, order_epoch = self.start, None, -1
        while True:
            epoch, b = divmod(micro, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = torch.randperm(self.num_items, generator=seeded_generator(self.seed, epoch)), epoch
            first = (b * self.world + self.rank) * self.batch_size
            yield order[first: first + self.batch_size].tolist()
            micro += 1


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up to train.lr over train.warmup_steps, then constant (as DDPM)."""
    t = cfg.train
    return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = cfg.train
    project = ProjectConfiguration(project_dir=t.output_dir, logging_dir=str(Path(t.output_dir) / "logs"))
    try:
        return Accelerator(
            mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
            cpu=cfg.runtime.cpu, log_with="tensorboard", project_config=project,
        )
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"train.mixed_precision={t.mixed_precision} is not available here ({exc}); "
                        "use train.mixed_precision=no or bf16.") from None


def save_training_grid(ema: EMA, cfg: Config, path: Path, num_images: int) -> Path:
    from .sampling import every_class_once, generate

    images, _ = generate(ema.model, every_class_once(cfg, num_images), progress=False)
    nrow = cfg.model.num_classes or None
    return save_grid(images, path, nrow=nrow, upscale=max(1, 128 // cfg.model.image_size))


class Throughput:
    """Images per second over the training steps only (grids and checkpoints excluded)."""

    def __init__(self):
        self.images, self.seconds, self._start = 0, 0.0, 0.0

    def start(self):
        self._start = time.perf_counter()

    def stop(self, images: int):
        self.seconds += time.perf_counter() - self._start
        self.images += images

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def optimizer_step(accelerator, model, optimizer, data, cfg: Config, lr: float, first_micro: int) -> list[torch.Tensor]:
    """One optimizer step over train.gradient_accumulation_steps micro-batches; their losses."""
    t = cfg.train
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = []
    for micro in range(first_micro, first_micro + t.gradient_accumulation_steps):
        batch = {k: v.to(accelerator.device) for k, v in next(data).items()}
        with accelerator.accumulate(model):
            loss = training_loss(model, batch, cfg, seeded_generator(t.seed, micro, accelerator.process_index))
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def train(cfg: Config, *, progress: bool = True) -> Path:
    """Run (or resume, per train.resume) a training run; returns the output folder."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = cfg.train
    out = Path(t.output_dir)
    accelerator = make_accelerator(cfg)
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.runtime.cpu_threads)
    set_seed(t.seed)  # before the model is built: same seed, same initial weights
    model = build_unet(cfg.model, cfg.runtime.backend)
    dataset, _ = build_dataset(cfg)
    resume_from = plan_output_dir(cfg, model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        claim_output_dir(cfg)
    accelerator.wait_for_everyone()

    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(accelerator.unwrap_model(model), t.ema_decay, t.ema_warmup)
    step = load_checkpoint(accelerator, resume_from, ema) if resume_from else 0

    world, accum = accelerator.num_processes, t.gradient_accumulation_steps
    effective = t.batch_size * world * accum
    accelerator.print(f"effective batch {effective} = {t.batch_size} per device x {world} process(es) x {accum} "
                      f"accumulation step(s); {len(dataset)} images; "
                      + (f"resuming from {resume_from}" if resume_from else "starting at step 0"))
    batches = EpochBatches(len(dataset), t.batch_size, world, accelerator.process_index, t.seed, start=step * accum)
    # A dedicated generator: a new loader iterator must not draw from the global RNG (dropout's).
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.num_workers, generator=torch.Generator())
    accelerator.init_trackers("train", config={k: str(v) for k, v in flat_config(cfg).items()})

    bar = tqdm(total=t.max_steps, initial=step, desc="training", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    speed, window = Throughput(), []
    data = iter(loader)
    while step < t.max_steps:
        speed.start()
        lr = learning_rate(cfg, step)
        window += optimizer_step(accelerator, model, optimizer, data, cfg, lr, first_micro=step * accum)
        step += 1
        ema.update(accelerator.unwrap_model(model))
        speed.stop(effective)
        bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            mean_loss = accelerator.reduce(torch.stack(window).mean(), "mean").item()
            window.clear()
            accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": speed.rate}, step=step)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed.rate:.0f}")
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            save_checkpoint(accelerator, out, step, ema, t.keep_checkpoints)
        if step % t.sample_every == 0 and step != t.max_steps and accelerator.is_main_process:
            save_training_grid(ema, cfg, out / "samples" / f"step-{step:07d}.png", t.sample_images)
    bar.close()

    if accelerator.is_main_process:
        export_model(ema.model, cfg, out / "model")
        grid = save_training_grid(ema, cfg, out / "samples" / "final.png", cfg.sample.num_images)
        accelerator.print(f"model: {out / 'model'}; samples: {grid}; "
                          f"{speed.rate:.1f} images/s over {speed.seconds:.0f} s of training steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out

