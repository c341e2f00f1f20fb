"""The diffusion objective: diffusers noise schedules, the denoising loss, and seeded randomness.

Training draws timesteps, noise, flips and label dropout from a generator seeded by
(seed, micro-batch index, process rank), never from the global RNG, so a resumed or multi-process
run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F

from .config import DiffusionConfig

_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def make_scheduler(d: DiffusionConfig, name: str = "ddpm"):
    """A diffusers scheduler (ddpm, ddim or dpm-solver++) for the DiffusionConfig's schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=_BETA_SCHEDULES[d.beta_schedule],
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction_type,
    )
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=True)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=True)
    if name == "dpm-solver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose ddpm, ddim or dpm-solver++")


@functools.lru_cache(maxsize=8)
def _noise_schedule(key: tuple):
    return make_scheduler(DiffusionConfig(*key), "ddpm")


def noise_schedule(d: DiffusionConfig):
    """The (cached) DDPM scheduler whose alphas define the forward process."""
    return _noise_schedule(dataclasses.astuple(d))


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed mixes all `keys` (e.g. seed, step, rank) without collisions."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def denoising_loss(model, images, timesteps, noise, labels, d: DiffusionConfig) -> torch.Tensor:
    """Per-sample mean squared error of the model's prediction (epsilon, v or x0 per
    d.prediction_type) at the given (image, timestep, noise) triples. `labels` may be None."""
    schedule = noise_schedule(d)
    noisy = schedule.add_noise(images, noise, timesteps)
    if d.prediction_type == "epsilon":
        target = noise
    elif d.prediction_type == "v_prediction":
        target = schedule.get_velocity(images, noise, timesteps)
    else:
        target = images
    prediction = model(noisy, timesteps, class_labels=labels).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def training_loss(model, batch: dict, cfg, generator: torch.Generator) -> torch.Tensor:
    """The mean loss of one micro-batch; every random draw comes from `generator`."""
    images, labels = batch["image"], batch["label"]
    n, device = images.shape[0], images.device
    timesteps = torch.randint(0, cfg.diffusion.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    drop = torch.rand(n, generator=generator) < cfg.train.label_dropout
    if cfg.data.random_flip:
        images = torch.where(flip.to(device)[:, None, None, None], images.flip(-1), images)
    if cfg.model.num_classes:  # classifier-free guidance: some labels become the null class
        labels = torch.where(drop.to(device), torch.full_like(labels, cfg.model.num_classes), labels)
    else:
        labels = None
    loss = denoising_loss(model, images, timesteps.to(device), noise.to(device), labels, cfg.diffusion)
    return loss.mean()
