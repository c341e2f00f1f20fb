"""The random numbers of a training micro-batch, drawn on the training device from one
generator, and the augmentations they drive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


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
