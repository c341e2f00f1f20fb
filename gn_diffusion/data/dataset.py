"""Datasets: scikit-learn's bundled digits (in memory), a folder of the user's own images and a
Hugging Face `datasets` split (both decoded lazily, see `sources` and `hf_source`).

Every dataset yields dicts {"image": float tensor [C, S, S] in [-1, 1], "label": int64 tensor}
(label -1 where the data has none) per item, and whole batches from __getitems__ (uint8 images
left for the training step to convert on the device). Random flips and crops are not applied
here but in the training step, from the step's seeded generator, so that a resumed run sees the
same ones.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import UserError
from ..images import from_uint8
from .sources import DataListing, FolderImages, decode_errors, pil_pixel_limit

DIGITS_CLASSES = 10
DIGITS_HELD_OUT = 297  # the held-out split: 1500 train + 297 held-out of 1797 images
_DIGITS_SPLIT_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def digits_arrays(split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, S, S] in [-1, 1] (bilinear from 8x8) and labels [N] of a fixed split.

    `split` is "train" (1500 images), "test" (the 297 held-out ones) or "all".
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).clamp(-1, 1)
    order = torch.from_numpy(np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels)))
    held_out, train = order[:DIGITS_HELD_OUT], order[DIGITS_HELD_OUT:]
    index = {"train": train, "test": held_out, "all": order}.get(split)
    if index is None:
        raise ValueError(f"split must be train, test or all, got {split!r}")
    return images[index].contiguous(), labels[index].contiguous()


class TensorImageDataset(Dataset):
    """In-memory images (float in [-1, 1], or uint8 in [0, 255]) and labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = self.images[i]
        if image.dtype == torch.uint8:
            image = from_uint8(image)
        return {"image": image, "label": self.labels[i]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch in one gather, left in its stored dtype (uint8 images are converted on
        the training device, by the training step)."""
        index = torch.as_tensor(indices)
        return {"image": self.images[index], "label": self.labels[index]}

    def listing(self) -> DataListing:
        """The pixels and labels themselves: they are in memory."""
        return DataListing.of(len(self), (self.images.numpy().tobytes(), self.labels.numpy().tobytes()))


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DataLoader's collate for datasets whose __getitems__ already returns the batch."""
    return batch


# ---------------------------------------------------------------------------------------------
# A folder of images


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a fixed (sorted) order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_source(root: str | Path, image_size: int, channels: int, class_labels: bool,
                  max_pixels: Optional[int] = None) -> tuple[FolderImages, list[str]]:
    """The usable images of a folder as a lazy source, and the class names.

    With `class_labels`, an image's class is the first sub-folder under `root` it lies in
    (sorted names give indices 0..K-1); otherwise labels are -1. Files whose header cannot be
    read or fails PIL's check, or whose header gives more than `max_pixels` pixels (default
    data.max_image_pixels' default), are skipped with a warning naming them. Each file is
    checked here, once, without decoding its pixels: the set is fixed before training starts.
    """
    root = Path(root)
    limit = DataConfig().max_image_pixels if max_pixels is None else max_pixels
    files = _image_files(root)
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if class_labels and not classes:
        raise UserError(f"data.class_labels is set but {root} has no sub-folders; put each class in its own sub-folder.")
    usable, unreadable, too_large = scan_headers(files, limit)
    if not usable:  # the sentence alone: no warnings before it
        raise UserError(f"none of the {len(files)} image files under {root} could be read ({len(unreadable)} "
                        f"unreadable, {len(too_large)} larger than data.max_image_pixels={limit}); check the files.")
    _warn_skipped(root, len(files), unreadable, too_large, limit)
    class_index = {name: i for i, name in enumerate(classes)}
    labels = [class_index[f.relative_to(root).parts[0]] if class_labels and len(f.relative_to(root).parts) > 1 else -1
              for f in usable]
    if class_labels and min(labels) < 0:
        raise UserError(f"data.class_labels is set but {root} has images outside class sub-folders; move them into one.")
    source = FolderImages(root, usable, torch.tensor(labels, dtype=torch.int64), image_size, channels, limit)
    return source, classes


def image_folder_arrays(
    root: str | Path, image_size: int, channels: int, class_labels: bool, max_pixels: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All usable images of a folder read at once: uint8 [N, C, S, S], labels [N] and the class
    names (see folder_source). For sets that evaluation holds in memory; training reads lazily."""
    source, classes = folder_source(root, image_size, channels, class_labels, max_pixels)
    return source.read_all(), source.labels, classes


def _image_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; set data.path to a folder of images.")
    files = list_images(root)
    if not files:
        raise UserError(
            f"data folder {root} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images; "
            "put images in it or point data.path elsewhere."
        )
    return files


def scan_headers(files: list[Path], max_pixels: int) -> tuple[list[Path], list[Path], list[tuple[Path, int, int]]]:
    """(usable files, unreadable files, (file, width, height) of those over `max_pixels`), from
    each file's header and PIL's verify (a PNG's chunk checksums, so a truncated body is found
    here rather than mid-run); no pixel is decoded, so an oversized file costs nothing."""
    from PIL import Image
    from tqdm.auto import tqdm

    usable, unreadable, too_large = [], [], []
    with pil_pixel_limit(None):  # our limit decides here, with the size in hand for the warning
        for f in tqdm(files, desc="checking images", leave=False, disable=len(files) < 1000):
            try:
                with Image.open(f) as img:
                    width, height = img.size
                    img.verify()
            except decode_errors():
                unreadable.append(f)
                continue
            (too_large.append((f, width, height)) if width * height > max_pixels else usable.append(f))
    return usable, unreadable, too_large


def _warn_skipped(root: Path, total: int, unreadable: list[Path], too_large: list[tuple[Path, int, int]],
                  limit: int) -> None:
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} unreadable image file(s) of {total} under {root}: "
                      f"{_names(root, unreadable)}.", stacklevel=3)
    if too_large:
        sized = [f"{f.relative_to(root)} ({w}x{h})" for f, w, h in too_large]
        warnings.warn(f"skipped {len(too_large)} image file(s) of {total} under {root} larger than "
                      f"data.max_image_pixels={limit}: {_names(root, sized)}.", stacklevel=3)


def _names(root: Path, items: list, shown: int = 10) -> str:
    """The first `shown` of `items` (paths are given relative to `root`), then how many more."""
    names = [str(i.relative_to(root)) if isinstance(i, Path) else i for i in items]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def build_dataset(cfg) -> Dataset:
    """The training set of a Config; a UserError when its classes are not model.num_classes. The
    digits are held in memory; image folders and hf data sets are decoded as they are fetched."""
    m, d = cfg.model, cfg.data
    if d.dataset == "digits":
        images, labels = digits_arrays("train", m.image_size)
        dataset, num_classes = TensorImageDataset(images, labels), DIGITS_CLASSES
    elif d.dataset == "hf":
        from .hf_source import hf_source

        dataset, num_classes = hf_source(d, m.image_size, m.in_channels, use_labels=m.num_classes > 0)
    else:
        dataset, classes = folder_source(d.path, m.image_size, m.in_channels, d.class_labels, d.max_image_pixels)
        num_classes = len(classes) if d.class_labels else 0
    if m.num_classes and m.num_classes != num_classes:
        raise UserError(
            f"model.num_classes is {m.num_classes} but the data has {num_classes or 'no'} classes; "
            f"set model.num_classes={num_classes}."
        )
    return dataset
