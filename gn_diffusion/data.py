"""Datasets: scikit-learn's bundled digits, and a folder of the user's own images.

Every dataset yields dicts {"image": float tensor [C, S, S] in [-1, 1], "label": int64 tensor}.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGITS_CLASSES = 10
DIGITS_HELD_OUT = 297  # the held-out split: 1500 train + 297 held-out of 1797 images
_DIGITS_SPLIT_SEED = 0


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
    """In-memory images and labels, with an optional random horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool = False):
        self.images = images
        self.labels = labels
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = self.images[i]
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": self.labels[i]}
