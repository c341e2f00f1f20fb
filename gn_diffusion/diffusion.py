"""The diffusion objective: diffusers noise schedules, the denoising loss, and seeded randomness.

Training draws timesteps, noise, flips, crop offsets and label dropout on the training device
from a generator seeded by (seed, micro-batch index, process rank), never from the global RNG, so
a resumed or multi-process run draws exactly what an uninterrupted one would. (CPU and CUDA generators draw
different numbers: a run continued on another kind of device is not bit-exact.)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import DiffusionConfig

_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# sample.scheduler -> (diffusers class, options beyond the schedule). Each class keeps its own
# default timestep spacing ("leading" for ddpm/ddim, "linspace" for the rest), as in diffusers.
_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", dict(clip_sample=True)),
    "ddim": ("DDIMScheduler", dict(clip_sample=True)),
    "dpm-solver++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),
}
SCHEDULER_NAMES = tuple(_SCHEDULERS)


def make_scheduler(d: DiffusionConfig, name: str = "ddpm"):
    """A diffusers scheduler (one of SCHEDULER_NAMES) for the DiffusionConfig's schedule."""
    import diffusers

    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose {', '.join(SCHEDULER_NAMES)}")
    class_name, options = _SCHEDULERS[name]
    return getattr(diffusers, class_name)(
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=_BETA_SCHEDULES[d.beta_schedule],
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction_type,
        **options,
        **_zero_snr(d),
    )


def _zero_snr(d: DiffusionConfig) -> dict:
    """A zero terminal SNR schedule; sampling must then start at the last timestep: trailing spacing."""
    return dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if d.rescale_betas_zero_snr else {}


@functools.lru_cache(maxsize=8)
def _noise_schedule(key: tuple):
    return make_scheduler(DiffusionConfig(*key), "ddpm")


def noise_schedule(d: DiffusionConfig):
    """The (cached) DDPM scheduler whose alphas define the forward process."""
    return _noise_schedule(dataclasses.astuple(d))


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with mixed_seed(*keys)."""
    return torch.Generator(device=device).manual_seed(mixed_seed(*keys))


def mixed_seed(*keys: int) -> int:
    """A 64-bit seed that mixes all `keys` (e.g. seed, step, rank) without collisions. Host
    arithmetic: it never waits on the device."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


@dataclass(frozen=True)
class NoiseTables:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) as float32 tensors on the training device, so
    noising is two gathers and a multiply-add, with no scheduler object inside the step."""

    signal: torch.Tensor
    noise: torch.Tensor

    def at(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.signal[timesteps].view(-1, 1, 1, 1), self.noise[timesteps].view(-1, 1, 1, 1)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_bar / (1 - alpha_bar) at each timestep: 0 at a zero-SNR schedule's last one."""
        return (self.signal[timesteps] / self.noise[timesteps]) ** 2


@functools.lru_cache(maxsize=8)
def _noise_tables(key: tuple, device: torch.device) -> NoiseTables:
    alphas = _noise_schedule(key).alphas_cumprod.to(torch.float64)
    return NoiseTables(alphas.sqrt().float().to(device), (1 - alphas).sqrt().float().to(device))


def noise_tables(d: DiffusionConfig, device: torch.device | str) -> NoiseTables:
    return _noise_tables(dataclasses.astuple(d), torch.device(device))


@dataclass(frozen=True)
class StepDraws:
    """The random numbers of one micro-batch: timesteps, noise, flip and label-dropout masks, and
    the random crops' (top, left) offsets into the padded images (None without data.random_crop)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    flip: torch.Tensor
    drop: torch.Tensor
    crop: Optional[torch.Tensor] = None


def draw_step(images: torch.Tensor, num_train_timesteps: int, label_dropout: float,
              generator: torch.Generator, offset_noise: float = 0.0, crop_pad: int = 0) -> StepDraws:
    """Every random draw of a micro-batch, from `generator` (on the images' device) alone.
    Offset noise (a constant per sample and channel added to the noise) and crop offsets
    (`crop_pad` is data.random_crop) are drawn after the others and only when asked, so a run
    without them draws what it always did."""
    n = images.shape[0]
    on = dict(generator=generator, device=images.device)
    timesteps = torch.randint(0, num_train_timesteps, (n,), **on)
    noise = torch.randn(images.shape, **on, dtype=torch.float32)
    flip = torch.rand(n, **on) < 0.5
    drop = torch.rand(n, **on) < label_dropout
    if offset_noise:
        noise = noise + offset_noise * torch.randn((*images.shape[:2], *[1] * (images.dim() - 2)), **on)
    crop = torch.randint(0, 2 * crop_pad + 1, (n, 2), **on) if crop_pad else None
    return StepDraws(timesteps, noise, flip, drop, crop)


def random_crop(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image reflect-padded by `pad` pixels and cut back to its size at its own (top, left)
    offset in [0, 2 * pad]: a shift of up to `pad` pixels at the true scale. The uncovered border
    is mirrored rather than black, so the model is not taught edges no real image has. Two
    gathers on the device: no host sync, and torch.compile traces it."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # [N, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # [N, W]
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def denoising_loss(model, images, timesteps, noise, labels, d: DiffusionConfig,
                   tables: NoiseTables | None = None) -> torch.Tensor:
    """Per-sample mean squared error of the model's prediction (epsilon, v or x0 per
    d.prediction_type) at the given (image, timestep, noise) triples. `labels` may be None;
    `tables` (default: those of `d` on the images' device) are fetched once by a caller that
    compiles this, so no scheduler is built inside the trace."""
    tables = tables or noise_tables(d, images.device)
    prediction, target = prediction_and_target(model, images, timesteps, noise, labels, d, tables)
    loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return loss if d.snr_gamma is None else loss * min_snr_weight(tables.snr(timesteps), d)


def min_snr_weight(snr: torch.Tensor, d: DiffusionConfig) -> torch.Tensor:
    """Min-SNR-gamma weights in the form of each prediction type's loss: min(SNR, g) divided by
    what the loss already weighs the x0 error by (SNR for epsilon, SNR + 1 for v, 1 for x0)."""
    clipped = torch.clamp(snr, max=d.snr_gamma)
    if d.prediction_type == "epsilon":
        return clipped / snr
    if d.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def prediction_and_target(model, images, timesteps, noise, labels, d: DiffusionConfig,
                          tables: NoiseTables | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's float32 prediction at the noised images, and what it should have predicted
    (epsilon, v or x0 per d.prediction_type)."""
    tables = tables or noise_tables(d, images.device)
    signal, sigma = tables.at(timesteps)
    noisy = torch.addcmul(signal * images, sigma, noise)  # signal * images + sigma * noise
    if d.prediction_type == "epsilon":
        target = noise
    elif d.prediction_type == "v_prediction":
        target = signal * noise - sigma * images
    else:
        target = images
    prediction = model(noisy.to(images.dtype), timesteps, class_labels=labels).sample
    return prediction.float(), target.float()


def objective(model, images: torch.Tensor, labels: torch.Tensor, draws: StepDraws, cfg,
              tables: NoiseTables | None = None) -> torch.Tensor:
    """The mean loss of one micro-batch given its draws: flips, crops, label dropout, noising and
    the denoising loss. Pure tensor code, so torch.compile traces it without a graph break."""
    if cfg.data.random_flip:
        images = torch.where(draws.flip[:, None, None, None], images.flip(-1), images)
    if cfg.data.random_crop:
        images = random_crop(images, draws.crop, cfg.data.random_crop)
    if cfg.model.num_classes:  # classifier-free guidance: some labels become the null class
        labels = torch.where(draws.drop, torch.full_like(labels, cfg.model.num_classes), labels)
    else:
        labels = None
    if cfg.diffusion.snr_gamma is not None:
        return denoising_loss(model, images, draws.timesteps, draws.noise, labels, cfg.diffusion, tables).mean()
    # Every sample has as many pixels, so the mean over all of them is the mean per-sample loss.
    return F.mse_loss(*prediction_and_target(model, images, draws.timesteps, draws.noise, labels, cfg.diffusion, tables))


def training_loss(model, batch: dict, cfg, generator: torch.Generator) -> torch.Tensor:
    """The mean loss of one micro-batch; every random draw comes from `generator`."""
    images, d = batch["image"], cfg.diffusion
    draws = draw_step(images, d.num_train_timesteps, cfg.train.label_dropout, generator, d.offset_noise,
                      cfg.data.random_crop)
    return objective(model, images, batch["label"], draws, cfg)
