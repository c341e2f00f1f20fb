"""Checks before any sampling work: the images fit in memory, and the scheduler takes the step
count."""

from __future__ import annotations

import dataclasses
import functools
import warnings

from ..config import Config, DiffusionConfig
from ..diffusion.schedules import make_scheduler
from ..errors import ConfigError
from ..images import grid_upscale
from .generate import image_shape


def images_bytes(cfg: Config, num_images: int) -> int:
    """A lower bound of the host memory `num_images` generated images take until they are written:
    float32 pixels, and their PNG grid at its upscaling (one byte per value)."""
    channels, size, _ = image_shape(cfg)
    upscale = grid_upscale(size)
    return num_images * channels * (size * size * 4 + (size * upscale) ** 2)


def check_images_fit(cfg: Config, images_key: str) -> None:
    """A ConfigError when the images that `images_key` (the key holding the number of images to
    generate: sample.num_images, train.sample_num_images or eval.num_images) asks for cannot fit in the
    memory available now: refused before any work, not after it."""
    import psutil

    section, name = images_key.split(".")
    num_images = getattr(getattr(cfg, section), name)
    need, free = images_bytes(cfg, num_images), psutil.virtual_memory().available
    if need <= free:
        return
    most = max(1, free // images_bytes(cfg, 1))
    raise ConfigError(f"'{images_key}' is {num_images}: {num_images} images of {'x'.join(map(str, image_shape(cfg)))} "
                      f"need at least {need / 2**30:,.1f} GiB of memory until they are written, but "
                      f"{free / 2**30:,.1f} GiB is available; set {images_key}={most} or fewer (more images: run again with another sample.seed).")


def check_sampling(cfg: Config, images_key: str = "sample.num_images") -> None:
    """A ConfigError if the images `images_key` asks for cannot fit in memory, or if the scheduler
    cannot take sample.num_inference_steps for this model's diffusion.num_train_timesteps.
    (Guidance is checked with the config: finite, and only on a class-conditional model.)"""
    check_images_fit(cfg, images_key)
    s, d = cfg.sample, cfg.diffusion
    if _takes_steps(dataclasses.astuple(d), s.scheduler, s.num_inference_steps):
        return
    limit = _most_steps(dataclasses.astuple(d), s.scheduler)
    raise ConfigError(f"'sample.num_inference_steps' is {s.num_inference_steps} but {s.scheduler} takes at most "
                      f"{limit} steps for this model (diffusion.num_train_timesteps={d.num_train_timesteps}); "
                      f"set sample.num_inference_steps={limit} or fewer.")


@functools.lru_cache(maxsize=64)
def _takes_steps(diffusion: tuple, scheduler: str, steps: int) -> bool:
    """Whether diffusers' scheduler makes `steps` distinct timesteps, tried on the scheduler
    itself: ddpm and ddim refuse more steps than num_train_timesteps; dpm-solver++ accepts
    num_train_timesteps or more but repeats a timestep and ends in NaN images (or an IndexError
    after the last step), and unipc repeats one from num_train_timesteps on. euler and heun
    space fractional timesteps evenly, so they take any count (heun lists each inner time
    twice, once per model call: distinct times are what count)."""
    sched = make_scheduler(DiffusionConfig(*diffusion), scheduler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' numpy deprecation notes
            sched.set_timesteps(steps)
    except ValueError:
        return False
    return len(set(sched.timesteps.tolist())) == steps


@functools.lru_cache(maxsize=16)
def _most_steps(diffusion: tuple, scheduler: str) -> int:
    """The largest step count the scheduler takes, by bisection over 1..num_train_timesteps (the
    accepted counts are 1..limit for every scheduler and schedule, measured: no gaps)."""
    low, high = 0, DiffusionConfig(*diffusion).num_train_timesteps
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _takes_steps(diffusion, scheduler, mid) else (low, mid - 1)
    return low
