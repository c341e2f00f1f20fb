"""The training objective: noise the images, predict, and weigh the squared error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DiffusionConfig
from .draws import StepDraws, draw_step, random_crop
from .schedules import NoiseTables, noise_tables


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


def training_loss(model, batch: dict, cfg, generator: torch.Generator,
                  tables: NoiseTables | None = None) -> torch.Tensor:
    """The mean loss of one micro-batch (images and labels on the training device), every random
    draw from `generator`: what each training step computes, and all it computes before the
    backward."""
    images, d = batch["image"], cfg.diffusion
    draws = draw_step(images, d.num_train_timesteps, cfg.train.label_dropout, generator, d.offset_noise,
                      cfg.data.random_crop)
    return objective(model, images, batch["label"], draws, cfg, tables)
