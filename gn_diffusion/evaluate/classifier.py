"""A feature extractor for any labelled data: the package's small CNN trained on the data's own
images and labels (eval.extractor=classifier; the digits' default, digits.py).

It is cached under a hash of everything it depends on (architecture, recipe, training data and
the training code), so a changed recipe, data set or training loop never loads a stale file.
Its recipe scales with the data (recipe_for): a fixed budget of images seen, so 1,500 digits
train for 20 epochs and 60,000 images for 3, within minutes on one CPU thread.
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

from ..data.dataset import DIGITS_CLASSES
from ..errors import UserError
from ..files import atomic_path, file_lock
from ..runtime import cpu_threads

CACHE_ENV = "GN_DIFFUSION_CACHE"
# Small networks on a busy 2-core machine run many times faster on one thread than on two
# spinning OpenMP threads; one thread also makes the cached weights independent of the core count.
CLASSIFIER_THREADS = 1
MAX_EPOCHS = 20  # small data sets (the digits) train this long
IMAGES_SEEN = 180_000  # larger ones stop at about this many images seen: 3 epochs of 60,000
SCALE_IMAGES = 10_000  # the feature scale's estimate needs no more training images than these


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


def recipe_for(num_images: int) -> ClassifierRecipe:
    """MAX_EPOCHS over a small data set, else as many epochs as IMAGES_SEEN allows (at least one)."""
    return ClassifierRecipe(epochs=max(1, min(MAX_EPOCHS, round(IMAGES_SEEN / max(num_images, 1)))))


class TrainedClassifier:
    """Features and predictions of a trained DigitsCNN (eval mode, no grad, in batches).

    Features are divided by their root-mean-square over the training split, so they have unit
    scale: KID's kernel (x.y / D + 1)^3 then works in the regime it was designed for, and Frechet
    distances read in units of that scale squared.
    """

    def __init__(self, net: DigitsCNN, train_images: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor],
                 name: str = "classifier-cnn"):
        self.net = net.eval()
        self.num_classes = net.head.out_features
        self.name = name
        self.scale = 1.0
        self.scale = float(self(train_images[:SCALE_IMAGES]).pow(2).mean().rsqrt())
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


def trained_classifier(train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
                       num_classes: int, cache: str | os.PathLike | None = None,
                       recipe: ClassifierRecipe | None = None, name: str = "classifier-cnn",
                       file_prefix: str = "classifier_cnn") -> TrainedClassifier:
    """A DigitsCNN for `train` (float images [N, C, S, S] in [-1, 1], labels [N] in 0..num_classes-1),
    loaded from the cache or trained with `recipe` (default recipe_for(N)) and cached; its
    accuracy is measured on `held_out`. Hashing the key reads the images once (a second for 60,000)."""
    images, labels = train
    net = DigitsCNN(in_channels=images.shape[1], num_classes=num_classes)
    recipe = recipe or recipe_for(len(images))
    key = _content_hash(net, recipe, images, labels)
    path = cache_dir(cache) / f"{file_prefix}-{images.shape[-1]}px-{key}.safetensors"
    with _training_lock(path):  # processes side by side train it once
        if not _load_cached(net, path):
            train_classifier(net, images, labels, recipe)
            _save_cached(net, path)
    return TrainedClassifier(net, images, held_out, name)


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

    if not all(torch.isfinite(p).all() for p in net.state_dict().values()):
        raise UserError("the classifier's training diverged (non-finite weights), so nothing was cached; "
                        "check the training images, or use eval.extractor=inception.")
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
