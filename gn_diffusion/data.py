"""Datasets: scikit-learn's bundled digits, and a folder of the user's own images.

Every dataset yields dicts {"image": float tensor [C, S, S] in [-1, 1], "label": int64 tensor}
(label -1 where the data has none). Random flips are not applied here but in the training step,
from the step's seeded generator, so that a resumed run sees the same flips.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import DataConfig
from .errors import UserError
from .images import from_uint8

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


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DataLoader's collate for datasets whose __getitems__ already returns the batch."""
    return batch


# ---------------------------------------------------------------------------------------------
# A folder of images


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a fixed (sorted) order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """uint8 [C, S, S]: resized so the short side is `image_size`, then center-cropped."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        scale = image_size / min(img.size)
        size = (max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def image_folder_arrays(
    root: str | Path, image_size: int, channels: int, class_labels: bool, max_pixels: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All readable images of a folder as uint8 [N, C, S, S], labels [N] and the class names.

    With `class_labels`, an image's class is the first sub-folder under `root` it lies in
    (sorted names give indices 0..K-1); otherwise labels are -1. Files that cannot be decoded, or
    whose header gives more than `max_pixels` pixels (default data.max_image_pixels' default), are
    skipped with a warning naming them. Every image is read here, once: the set is fixed before
    training starts.
    """
    root = Path(root)
    limit = DataConfig().max_image_pixels if max_pixels is None else max_pixels
    files = _image_files(root)
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if class_labels and not classes:
        raise UserError(f"data.class_labels is set but {root} has no sub-folders; put each class in its own sub-folder.")
    usable, unreadable, too_large = scan_headers(files, limit)
    images, read, failed = _decode_all(usable, image_size, channels, limit)
    unreadable = sorted(unreadable + failed)
    if not images:  # the sentence alone: no warnings before it
        raise UserError(f"none of the {len(files)} image files under {root} could be read ({len(unreadable)} "
                        f"unreadable, {len(too_large)} larger than data.max_image_pixels={limit}); check the files.")
    _warn_skipped(root, len(files), unreadable, too_large, limit)
    class_index = {name: i for i, name in enumerate(classes)}
    labels = [class_index[f.relative_to(root).parts[0]] if class_labels and len(f.relative_to(root).parts) > 1 else -1
              for f in read]
    if class_labels and min(labels) < 0:
        raise UserError(f"data.class_labels is set but {root} has images outside class sub-folders; move them into one.")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes


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


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a corrupt, truncated or oversized file (PIL turns most into OSError)."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, struct.error,
            Image.DecompressionBombError, Image.DecompressionBombWarning)


@contextlib.contextmanager
def pil_pixel_limit(limit: Optional[int]) -> Iterator[None]:
    """PIL's decompression-bomb limit set to `limit` (None: off) with its warning raised as an
    error, so an oversized file is refused before its pixels are allocated; restored after."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def scan_headers(files: list[Path], max_pixels: int) -> tuple[list[Path], list[Path], list[tuple[Path, int, int]]]:
    """(usable files, unreadable files, (file, width, height) of those over `max_pixels`), from
    each file's header alone: Image.open decodes no pixel, so an oversized file costs nothing."""
    from PIL import Image

    usable, unreadable, too_large = [], [], []
    with pil_pixel_limit(None):  # our limit decides here, with the size in hand for the warning
        for f in files:
            try:
                with Image.open(f) as img:
                    width, height = img.size
            except _decode_errors():
                unreadable.append(f)
                continue
            (too_large.append((f, width, height)) if width * height > max_pixels else usable.append(f))
    return usable, unreadable, too_large


def _decode_all(files: list[Path], image_size: int, channels: int,
                max_pixels: int) -> tuple[list[np.ndarray], list[Path], list[Path]]:
    """(the decoded images, the files they came from, the files that failed to decode: a body
    truncated or corrupt behind a good header)."""
    from tqdm.auto import tqdm

    images, read, failed = [], [], []
    # PIL's own check, at our limit, guards a file that grew after its header was scanned.
    with pil_pixel_limit(max_pixels):
        for f in tqdm(files, desc="reading images", leave=False, disable=len(files) < 1000):
            try:
                images.append(read_image(f, image_size, channels))
            except _decode_errors():
                failed.append(f)
                continue
            read.append(f)
    return images, read, failed


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


def build_dataset(cfg) -> tuple[TensorImageDataset, int]:
    """The training set of a Config and its number of classes (0 when it has no labels)."""
    m, d = cfg.model, cfg.data
    if d.dataset == "digits":
        images, labels = digits_arrays("train", m.image_size)
        num_classes = DIGITS_CLASSES
    else:
        images, labels, classes = image_folder_arrays(d.path, m.image_size, m.in_channels, d.class_labels,
                                                      max_pixels=d.max_image_pixels)
        num_classes = len(classes) if d.class_labels else 0
    if m.num_classes and m.num_classes != num_classes:
        raise UserError(
            f"model.num_classes is {m.num_classes} but the data has {num_classes or 'no'} classes; "
            f"set model.num_classes={num_classes}."
        )
    return TensorImageDataset(images, labels), num_classes
