"""Image files: uint8 to and from tensors in [-1, 1], PNG grids and single PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .files import atomic_path


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1], any shape."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """The images tiled row by row (nrow per row, default square-ish) with a `pad`-pixel border."""
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = tile
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Write a PNG grid, whole or not at all; `upscale` enlarges it (nearest) so small images can
    be seen."""
    from PIL import Image

    path = Path(path)
    img = _pil(grid_array(images, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp)
    return path


def save_pngs(images: torch.Tensor, folder: str | Path) -> list[Path]:
    """One PNG per image, named by its index: 000000.png, 000001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(to_uint8(images)):
        paths.append(folder / f"{i:06d}.png")
        _pil(array).save(paths[-1])
    return paths


def grid_upscale(image_size: int) -> int:
    return max(1, 128 // image_size)  # small images are enlarged to about 128 pixels
