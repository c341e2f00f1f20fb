"""sample.py's output folder: one set of images, ours alone, replaced whole."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_folder, check_name_fits, check_writable, restore_swapped
from ..images import grid_upscale, save_grid, save_pngs, to_uint8


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
