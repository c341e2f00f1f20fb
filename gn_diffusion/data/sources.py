"""Image sources decoded lazily: each item is read, resized and center-cropped when the
DataLoader fetches it (in its workers when data.num_workers > 0), so memory stays flat however
large the data set is. Which items exist is fixed when the source is built, before training, so
a shuffle over its indices is the same in every session of a run.

A source yields batches as {"image": uint8 [B, C, S, S], "label": int64 [B]} from __getitems__
(the training step converts uint8 to [-1, 1] on the device) and one float item from __getitem__.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..images import from_uint8
from ..memory import lower_on_oom


@dataclass(frozen=True)
class DataListing:
    """Which images a run trains on, in brief: their count and a digest of what identifies them
    (a folder's file names and sizes, an hf split's fingerprint and rows, in-memory pixels). A
    run records it at its start, so a resume can tell that the data changed underneath it."""

    images: int
    digest: str

    @classmethod
    def of(cls, images: int, parts: Iterable[bytes]) -> "DataListing":
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        return cls(images, digest.hexdigest())


def decode_errors() -> tuple[type[BaseException], ...]:
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


def fit_image(img, image_size: int, channels: int) -> np.ndarray:
    """uint8 [C, S, S] of an open PIL image: resized so the short side is `image_size`, then
    center-cropped."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    scale = image_size / min(img.size)
    size = (max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def read_image(source: Any, image_size: int, channels: int) -> np.ndarray:
    """uint8 [C, S, S] of a file path, a file object or encoded bytes."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as img:
        return fit_image(img, image_size, channels)


class LazyImages(Dataset, abc.ABC):
    """Items decoded when fetched. A subclass says where item i's encoded image is (`_sources`)
    and what to call it in a warning (`_name`).

    An item that fails to decode here although it passed the check made when the source was
    built (a body corrupt behind a good header, a file changed since) is replaced by the next
    item that decodes, with a warning naming it: a run of days does not stop for one bad file,
    and the replacement is the same in every session, so resume stays exact.
    """

    def __init__(self, labels: torch.Tensor, image_size: int, channels: int, max_pixels: int):
        self.labels, self.image_size, self.channels, self.max_pixels = labels, image_size, channels, max_pixels
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def _sources(self, indices: Sequence[int]) -> list[Any]:
        """Item indices' encoded images: paths, or bytes."""

    @abc.abstractmethod
    def _name(self, i: int) -> str:
        """What a warning calls item i."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {"image": from_uint8(batch["image"][0]), "label": batch["label"][0]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        images, used = [], []
        # PIL's own check, at our limit, guards a file that grew; running out of memory names the limit.
        with pil_pixel_limit(self.max_pixels), lower_on_oom("reading images", "data.max_image_pixels"):
            for i, source in zip(indices, self._sources(indices)):
                array, j = self._decode(i, source)
                images.append(array)
                used.append(j)
        return {"image": torch.from_numpy(np.stack(images)), "label": self.labels[torch.as_tensor(used)]}

    def _decode(self, i: int, source: Any) -> tuple[np.ndarray, int]:
        """(item i's pixels, i), or those of the next item that decodes and its index."""
        for step in range(len(self)):
            j = (i + step) % len(self)
            try:
                return read_image(source if step == 0 else self._sources([j])[0], self.image_size, self.channels), j
            except decode_errors() as exc:
                self._warn(j, exc)
        raise RuntimeError(f"none of the {len(self)} images could be decoded")

    def _warn(self, i: int, exc: BaseException) -> None:
        if i not in self._warned:  # once per item and process (each loader worker says it once)
            self._warned.add(i)
            warnings.warn(f"could not decode {self._name(i)} ({type(exc).__name__}: {exc}); the next image "
                          "is used in its place; remove or replace the file.", stacklevel=3)

    def read_all(self, chunk: int = 1024) -> torch.Tensor:
        """Every item as one uint8 tensor [N, C, S, S] (for evaluation's held-out set)."""
        out = torch.empty((len(self), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        for start in range(0, len(self), chunk):
            out[start: start + chunk] = self.__getitems__(range(start, min(start + chunk, len(self))))["image"]
        return out


class FolderImages(LazyImages):
    """Image files under `root` (a list fixed by the caller), decoded when fetched. The paths are
    kept as one byte array, not a list of Python strings: a forked loader worker then shares them
    instead of copying every page that a reference count touches."""

    def __init__(self, root: Path, files: list[Path], labels: torch.Tensor, image_size: int, channels: int,
                 max_pixels: int):
        super().__init__(labels, image_size, channels, max_pixels)
        self.root = Path(root)
        self.files = np.array([os.fsencode(f.relative_to(root)) for f in files], dtype=np.bytes_)

    def _path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.files[i])

    def listing(self) -> DataListing:
        """Names and sizes: a file added, removed, renamed or rewritten changes it."""
        return DataListing.of(len(self), (b"%s\0%d\n" % (name, self._path(i).stat().st_size)
                                          for i, name in enumerate(self.files)))

    def _sources(self, indices: Sequence[int]) -> list[Path]:
        return [self._path(i) for i in indices]

    def _name(self, i: int) -> str:
        return str(self._path(i))


class FloatImages:
    """A source seen as float images in [-1, 1], decoded when indexed by a tensor of indices:
    what evaluation's floor draws a few real training images from, without reading them all."""

    def __init__(self, source: LazyImages):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return from_uint8(self.source.__getitems__(torch.as_tensor(index).reshape(-1).tolist())["image"])
