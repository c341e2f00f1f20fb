"""Sampling: load an exported model, generate images with a diffusers scheduler, save them.

Image i starts from noise drawn from a generator seeded by (sample.seed, i) and that generator
also feeds the scheduler's own noise (ddpm), so an image does not depend on the batch size or
on how many processes share the work. The loop follows diffusers' pipelines (noise drawn per
generator as randn_tensor does, scaled by init_noise_sigma, model input by scale_model_input),
so a diffusers pipeline given the same generators makes the same images.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import latest_checkpoint
from .config import Config, DiffusionConfig, RuntimeConfig, load_config, parse_override, with_overrides
from .diffusion import make_scheduler, seeded_generator
from .errors import ConfigError, UserError
from .files import atomic_folder, check_name_fits, check_writable, lock_holder, restore_swapped
from .images import save_grid, save_pngs, to_uint8
from .layout import CHECKPOINT_MODEL_FILE, CONFIG_FILE, UNET_DIR, WEIGHTS_FILE, RunLayout
from .memory import lower_on_oom
from .model_io import exported_weights, load_weights, model_weights
from .run_dir import refuse_writing_into
from .threads import set_cpu_threads
from .unet import GNUNet, build_unet


def model_dir(path: str | Path) -> Path:
    """The model folder of a run's output folder, or `path` itself if it is a model folder. An
    export killed between swap_folder's two renames left no model/ but the previous one, whole,
    at .old-model: it is put back first, as a reused output folder's set is."""
    path = Path(path)
    run = RunLayout(path)
    # A run being trained may be exporting, between the two renames: its folders are left alone.
    if all(lock_holder(RunLayout(folder).lock) is None for folder in (path, path.parent)):
        if not path.exists():
            restore_swapped(path)  # a model folder named directly
        restore_swapped(run.model)
    if (run.model / CONFIG_FILE).is_file():
        return run.model
    if (path / CONFIG_FILE).is_file() and model_weights(path) is not None:
        return path
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a training run's output folder or its model/ folder.")
    raise UserError(f"{path} holds no exported model ({CONFIG_FILE} and {UNET_DIR}/{WEIGHTS_FILE}, or {WEIGHTS_FILE} "
                    "in an older export); pass a finished run's output folder or its model/ folder.")


def load_model(path: str | Path, *, use_ema: bool = True,
               runtime: RuntimeConfig | None = None) -> tuple[GNUNet, Config]:
    """The exported (EMA) model of a run, in eval mode, and the run's Config.

    The run's own runtime settings said how it ran where it trained; the model runs here with
    `runtime` (default: RuntimeConfig()). With `use_ema=False` the raw weights of the run's
    latest checkpoint are loaded instead.
    """
    folder = model_dir(path)
    cfg = dataclasses.replace(load_config(folder / CONFIG_FILE), runtime=runtime or RuntimeConfig())
    model = build_unet(cfg.model, cfg.runtime)
    weights = exported_weights(folder)
    if not use_ema:
        checkpoint = latest_checkpoint(folder.parent)
        if checkpoint is None:
            raise UserError(f"{folder.parent} has no checkpoint with raw weights; set sample.use_ema=true.")
        weights = checkpoint / CHECKPOINT_MODEL_FILE
    load_weights(model, weights)
    return model.eval(), cfg


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


def images_bytes(cfg: Config, count: int) -> int:
    """A lower bound of the host memory `count` generated images take until they are written:
    float32 pixels, and their PNG grid at its upscaling (one byte per value)."""
    channels, size, _ = image_shape(cfg)
    upscale = grid_upscale(size)
    return count * channels * (size * size * 4 + (size * upscale) ** 2)


def grid_upscale(image_size: int) -> int:
    return max(1, 128 // image_size)  # small images are enlarged to about 128 pixels


def check_images_fit(cfg: Config, key: str) -> None:
    """A ConfigError when the images that `key` (sample.num_images or train.sample_images) asks
    for cannot fit in the memory available now: refused before any work, not after it."""
    import psutil

    section, name = key.split(".")
    count = getattr(getattr(cfg, section), name)
    need, free = images_bytes(cfg, count), psutil.virtual_memory().available
    if need <= free:
        return
    most = max(1, free // images_bytes(cfg, 1))
    raise ConfigError(f"'{key}' is {count}: {count} images of {'x'.join(map(str, image_shape(cfg)))} need at least "
                      f"{need / 2**30:,.1f} GiB of memory until they are written, but {free / 2**30:,.1f} GiB is "
                      f"available; set {key}={most} or fewer (more images: run again with another sample.seed).")


def _gather_slices(accelerator, images: torch.Tensor, total: int) -> torch.Tensor:
    """All ranks' contiguous slices in order (slices differ in length by at most one)."""
    sizes = [len(part) for part in np.array_split(np.arange(total), accelerator.num_processes)]
    padded = torch.zeros((max(sizes), *images.shape[1:]), dtype=images.dtype)
    padded[: len(images)] = images
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu().reshape(len(sizes), max(sizes), *images.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


# ---------------------------------------------------------------------------------------------
# Checks before any sampling work


def check_sampling(cfg: Config, count_key: str = "sample.num_images") -> None:
    """A ConfigError if the images `count_key` asks for cannot fit in memory, or if the scheduler
    cannot take sample.num_inference_steps for this model's diffusion.num_train_timesteps.
    (Guidance is checked with the config: finite, and only on a class-conditional model.)"""
    check_images_fit(cfg, count_key)
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


# ---------------------------------------------------------------------------------------------
# The output folder: one set of images, ours alone

SET_FILES = ("grid.png", "samples.npz")
SET_IMAGES = "images"
_IMAGE_NAME = re.compile(r"\d{6}\.png")


def foreign_entries(folder: Path) -> list[str]:
    """What `folder` holds besides an earlier set of ours (grid.png, samples.npz, images/NNNNNN.png)."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name == SET_IMAGES and entry.is_dir() and not entry.is_symlink():
            found += [f"{SET_IMAGES}/{p.name}" for p in sorted(entry.iterdir())
                      if not (_IMAGE_NAME.fullmatch(p.name) and p.is_file())]
        elif not (entry.name in SET_FILES and entry.is_file()):
            found.append(entry.name)
    return found


def check_output_folder(folder: str | Path) -> None:
    """Refuse an output folder that holds anything but an earlier set of ours (which a new set
    replaces whole), or one that cannot be written; run before generating, so no work is lost."""
    folder = Path(folder)
    check_name_fits(folder)
    restore_swapped(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    others = foreign_entries(folder) if folder.is_dir() else []
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise UserError(f"the output folder {folder} holds {others[0]}{more} besides sample.py's own outputs "
                        "(grid.png, images/, samples.npz), which a new set would replace; set sample.output_dir "
                        "to a new or empty folder.")
    check_writable(folder.parent)  # the new set is written beside the folder, then swapped in


def save_samples(images: torch.Tensor, labels: torch.Tensor, folder: str | Path) -> Path:
    """grid.png, images/<index>.png and samples.npz (uint8 images [N, H, W, C] and labels).

    The set is written beside `folder` and swapped in whole, so an earlier set there is replaced,
    never mixed with this one, and a crash leaves one set or the other."""
    folder = Path(folder)
    check_output_folder(folder)
    with atomic_folder(folder) as tmp:
        save_grid(images, tmp / "grid.png", upscale=grid_upscale(images.shape[-1]))
        save_pngs(images, tmp / SET_IMAGES)
        np.savez_compressed(tmp / "samples.npz", images=to_uint8(images), labels=labels.numpy())
    return folder


def check_changeable(overrides: list[str], sections: tuple[str, ...], command: str) -> None:
    """A ConfigError naming the first override outside `sections` (the others belong to training)."""
    fixed = [key for key, _ in map(parse_override, overrides) if not key.startswith(sections)]
    if fixed:
        allowed = " and ".join(f"{s}*" for s in sections)
        raise ConfigError(f"{command} takes only {allowed} settings (got {fixed[0]}); train another model to change the others.")


def config_here(run_cfg: Config, overrides: list[str]) -> Config:
    """A trained run's config with `overrides`; runtime starts from the defaults, since the run's
    own said how it ran where it trained."""
    return with_overrides(dataclasses.replace(run_cfg, runtime=RuntimeConfig()), overrides)


def sample_config(path: str | Path, overrides: list[str]) -> Config:
    """The config sample.py runs with: the model's, with `sample.*` and `runtime.*` overrides."""
    check_changeable(overrides, ("sample.", "runtime."), "sample.py")
    return config_here(load_config(model_dir(path) / CONFIG_FILE), overrides)


def sample_main(path: str, overrides: list[str]) -> Path:
    """sample.py: load a run's model, apply `sample.*` overrides, generate and save. Every check
    (settings, step count, output folder) runs before the model is loaded."""
    from accelerate import Accelerator

    folder = model_dir(path)
    cfg = sample_config(folder, overrides)
    out = Path(cfg.sample.output_dir or RunLayout(folder.parent).generated)
    check_sampling(cfg)
    refuse_writing_into(out, "wait for it to end, or set sample.output_dir outside that run")
    check_output_folder(out)
    accelerator = Accelerator(cpu=cfg.runtime.cpu)
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.runtime.cpu_threads)
    model, _ = load_model(folder, use_ema=cfg.sample.use_ema, runtime=cfg.runtime)
    model.to(accelerator.device)
    images, labels = generate(model, cfg, accelerator=accelerator)
    if accelerator.is_main_process:
        save_samples(images, labels, out)
        print(f"wrote {len(images)} images to {out} (grid.png, images/, samples.npz)")
    accelerator.wait_for_everyone()
    return out
