"""The default feature extractor: a small CNN trained on the digits' training split.

FID's Inception weights cannot be downloaded here, so the features come from this network
instead: it trains in seconds on a CPU and is cached under a hash of everything it depends on
(architecture, recipe, training data and the training code), so a changed recipe or training
loop never loads a stale file.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import DIGITS_CLASSES, digits_arrays
from .files import atomic_path, file_lock
from .threads import cpu_threads

CACHE_ENV = "GN_DIFFUSION_CACHE"
# Small networks on a busy 2-core machine run many times faster on one thread than on two
# spinning OpenMP threads; one thread also makes the cached weights independent of the core count.
CLASSIFIER_THREADS = 1


class DigitsCNN(nn.Module):
    """Two strided conv stages, pooled to 4x4, then a 64-d penultimate layer and the class head."""

    def __init__(self, in_channels: int = 1, num_classes: int = DIGITS_CLASSES, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # any resolution >= 8 gives the same layout
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


@dataclass(frozen=True)
class ClassifierRecipe:
    epochs: int = 20
    batch_size: int = 50
    lr: float = 2e-3
    seed: int = 0


class DigitsClassifier:
    """Features and predictions of a trained DigitsCNN (eval mode, no grad, in batches).

    Features are divided by their root-mean-square over the training split, so they have unit
    scale: KID's kernel (x.y / D + 1)^3 then works in the regime it was designed for, and Frechet
    distances read in units of that scale squared.
    """

    num_classes = DIGITS_CLASSES
    name = "digits-cnn"

    def __init__(self, net: DigitsCNN, train_images: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor]):
        self.net = net.eval()
        self.scale = 1.0
        self.scale = float(self(train_images).pow(2).mean().rsqrt())
        images, labels = held_out
        self.held_out_accuracy = float((self.predict(images) == labels).float().mean())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with cpu_threads(CLASSIFIER_THREADS):
            return torch.cat([self.net.body(b) for b in _batches(images)]) * self.scale

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with cpu_threads(CLASSIFIER_THREADS):
            return torch.cat([self.net(b).argmax(1) for b in _batches(images)])


def _batches(images: torch.Tensor, size: int = 500):
    images = images.float().cpu()
    return (images[i : i + size] for i in range(0, len(images), size))


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """`path`, else $GN_DIFFUSION_CACHE, else ~/.cache/gn_diffusion."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gn_diffusion")


def digits_classifier(image_size: int, cache: str | os.PathLike | None = None,
                      recipe: ClassifierRecipe = ClassifierRecipe()) -> DigitsClassifier:
    """The digits classifier at `image_size`, loaded from the cache or trained (and cached)."""
    train_x, train_y = digits_arrays("train", image_size)
    net = DigitsCNN()
    path = cache_dir(cache) / f"digits_cnn-{image_size}px-{_content_hash(net, recipe, train_x, train_y)}.safetensors"
    with _training_lock(path):  # processes side by side train it once
        if not _load_cached(net, path):
            train_classifier(net, train_x, train_y, recipe)
            _save_cached(net, path)
    return DigitsClassifier(net, train_x, digits_arrays("test", image_size))


@contextlib.contextmanager
def _training_lock(path: Path) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path.with_name(path.name + ".lock")))
        except OSError:
            pass  # a read-only cache folder takes no lock; a cached file is still read
        yield


def _load_cached(net: nn.Module, path: Path) -> bool:
    from safetensors.torch import load_file

    try:
        net.load_state_dict(load_file(path))
    except Exception:  # missing, truncated or stale: our own cache file, so the caller retrains and replaces it
        return False
    return True


def _save_cached(net: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # Atomic: a concurrent reader (another test process, another sweep) sees the old file or the whole new one.
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)


def _content_hash(net: nn.Module, recipe: ClassifierRecipe, images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(repr(net).encode())
    h.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    h.update(inspect.getsource(train_classifier).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]


def train_classifier(net: DigitsCNN, images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe) -> None:
    """Train `net` in place with Adam and a one-cycle schedule, from `recipe.seed`."""
    with torch.random.fork_rng(devices=[]), cpu_threads(CLASSIFIER_THREADS):  # the caller's RNG is untouched
        torch.manual_seed(recipe.seed)
        net.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        order = torch.Generator().manual_seed(recipe.seed)
        opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
        steps = recipe.epochs * math.ceil(len(images) / recipe.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
        net.train()
        for _ in range(recipe.epochs):
            perm = torch.randperm(len(images), generator=order)
            for i in range(0, len(images), recipe.batch_size):
                idx = perm[i : i + recipe.batch_size]
                loss = F.cross_entropy(net(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
