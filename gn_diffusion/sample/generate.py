"""Generation: denoise seeded noise with a diffusers scheduler, on one process or several.

Image i starts from noise drawn from a generator seeded by (sample.seed, i) and that generator
also feeds the scheduler's own noise (ddpm), so an image does not depend on the batch size or
on how many processes share the work. The loop follows diffusers' pipelines (noise drawn per
generator as randn_tensor does, scaled by init_noise_sigma, model input by scale_model_input),
so a diffusers pipeline given the same generators makes the same images.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch

from ..config import Config
from ..diffusion.schedules import make_scheduler
from ..diffusion.seeding import seeded_generator
from ..memory import lower_on_oom


def every_class_once(cfg: Config, num_images: int) -> Config:
    """cfg whose sampling makes `num_images` images; a class-conditional model with no
    sample.class_labels asks for every class in turn (so a grid has one column per class)."""
    classes = list(range(cfg.model.num_classes)) or None
    sample = dataclasses.replace(cfg.sample, num_images=num_images, class_labels=cfg.sample.class_labels or classes)
    return dataclasses.replace(cfg, sample=sample)


def image_labels(cfg: Config) -> torch.Tensor:
    """Image i's class: sample.class_labels cycled, or -1 (unconditional)."""
    s = cfg.sample
    if not s.class_labels:
        return torch.full((s.num_images,), -1, dtype=torch.int64)
    return torch.tensor(s.class_labels, dtype=torch.int64).repeat(s.num_images // len(s.class_labels) + 1)[: s.num_images]


@torch.no_grad()
def predict(model, x, t, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The model output, with classifier-free guidance toward `labels` when the scale is not 1."""
    if model.config.num_classes == 0:
        return model(x, t).sample
    null = torch.full_like(labels, model.config.num_classes)
    cond = torch.where(labels >= 0, labels, null)
    if guidance_scale == 1.0 or bool((labels < 0).all()):
        return model(x, t, class_labels=cond).sample
    both = model(torch.cat([x, x]), t, class_labels=torch.cat([cond, null])).sample
    out_cond, out_null = both.chunk(2)
    return out_null + guidance_scale * (out_cond - out_null)


@torch.no_grad()
def sample_batch(model, cfg: Config, indices: list[int], labels: torch.Tensor) -> torch.Tensor:
    """Denoise the images with these indices; returns float32 CPU [n, C, S, S] in [-1, 1]."""
    s, m = cfg.sample, cfg.model
    device = next(model.parameters()).device
    generators = [seeded_generator(s.seed, i) for i in indices]
    # One [1, C, S, S] draw per image, as diffusers' randn_tensor draws for a list of generators.
    shape = (1, m.in_channels, m.image_size, m.image_size)
    noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)
    scheduler = make_scheduler(cfg.diffusion, s.scheduler)
    x = denoise(model, scheduler, noise, labels.to(device), s.guidance_scale, s.num_inference_steps, generators)
    return x.float().clamp(-1, 1).cpu()


@torch.no_grad()
def denoise(model, scheduler, noise: torch.Tensor, labels: torch.Tensor, guidance_scale: float, steps: int,
            generators: list[torch.Generator] | None) -> torch.Tensor:
    """Run `scheduler` from unit-variance `noise` in `steps` steps; the samplers' output, unclamped.

    Shared by sample_batch and GNPipeline. Heun's two model calls per step need nothing here:
    its timesteps list each inner time twice and step() alternates between the two stages.
    """
    scheduler.set_timesteps(steps)
    # Only some schedulers draw noise in step() (ddpm, euler's churn); the others take no generator.
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = predict(model, scheduler.scale_model_input(x, t), t, labels, guidance_scale)
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def generate(model, cfg: Config, *, accelerator=None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 CPU [N, C, S, S] in [-1, 1], labels int64 [N], -1 where unconditional).

    With a multi-process accelerator each rank denoises a contiguous slice and every rank
    receives all images.
    """
    from tqdm.auto import tqdm

    s = cfg.sample
    labels = image_labels(cfg)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = np.array_split(np.arange(s.num_images), world)[rank].tolist()
    chunks = [mine[i: i + s.batch_size] for i in range(0, len(mine), s.batch_size)]
    show = progress and rank == 0 and len(chunks) > 1
    # Filled batch by batch: the batches and their concatenation are never in memory together.
    images = torch.empty((len(mine), *image_shape(cfg)))
    with lower_on_oom("sampling", "sample.batch_size"):
        for chunk in tqdm(chunks, desc="sampling", disable=not show):
            images[chunk[0] - mine[0]: chunk[-1] - mine[0] + 1] = sample_batch(model, cfg, chunk, labels[chunk])
    if world > 1:
        images = _gather_slices(accelerator, images, s.num_images)
    return images, labels


def image_shape(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    return m.in_channels, m.image_size, m.image_size


def _gather_slices(accelerator, images: torch.Tensor, total: int) -> torch.Tensor:
    """All ranks' contiguous slices in order (slices differ in length by at most one)."""
    sizes = [len(part) for part in np.array_split(np.arange(total), accelerator.num_processes)]
    padded = torch.zeros((max(sizes), *images.shape[1:]), dtype=images.dtype)
    padded[: len(images)] = images
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu().reshape(len(sizes), max(sizes), *images.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
