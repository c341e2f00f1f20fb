"""Offline sample quality: Frechet distance, KID and class statistics on a small classifier's features.

FID's Inception weights cannot be downloaded here, so the default feature extractor is a small CNN
trained on the training split of the bundled digits (seconds on a CPU, cached by a content hash).
Every score is reported beside its floor: the same score for real training images of the same count
against the same held-out reference, which is what a perfect generator would get.

Any feature extractor plugs in: a callable `images [N, C, H, W] in [-1, 1] -> features [N, D]`.
If it also has `predict(images) -> class indices [N]` and an integer `num_classes`, the class
statistics (coverage, KL from uniform, per-class accuracy) are computed too.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, apply_overrides, build_typed, parse_override
from .data import DIGITS_CLASSES, digits_arrays
from .errors import ConfigError, UserError
from .images import from_uint8

CACHE_ENV = "GN_DIFFUSION_CACHE"


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class EvalSettings:
    num_samples: int = 500  # images generated per evaluation; the floor uses as many real ones
    kid_subsets: int = 100
    kid_subset_size: int = 100  # capped at the smaller of the two sets
    coverage_share: float = 0.25  # a class is covered when it gets >= this share of N / num_classes
    seed: int = 0  # picks the floor's real images and the KID subsets
    extractor: Optional[str] = None  # "module:factory"; None: the digits classifier
    cache_dir: Optional[str] = None  # None: $GN_DIFFUSION_CACHE or ~/.cache/gn_diffusion
    reference_dir: Optional[str] = None  # image-folder models: held-out real images to compare with


def validate_settings(s: EvalSettings, prefix: str = "eval.") -> None:
    for key in ("num_samples", "kid_subsets", "kid_subset_size"):
        if getattr(s, key) < 2:
            raise ConfigError(f"'{prefix}{key}' must be at least 2, got {getattr(s, key)}.")
    if not 0 < s.coverage_share <= 1:
        raise ConfigError(f"'{prefix}coverage_share' must be in (0, 1], got {s.coverage_share}.")
    if s.extractor is not None and ":" not in s.extractor:
        raise ConfigError(
            f"'{prefix}extractor' is {s.extractor!r}; write it as module:factory, e.g. my_feats:inception."
        )


def split_eval_overrides(overrides: list[str]) -> tuple[EvalSettings, list[str]]:
    """`eval.*` overrides become EvalSettings; `sample.*` ones are returned for the run's config."""
    evals, sample = [], []
    for item in overrides:
        key, _ = parse_override(item)
        if key.startswith("eval."):
            evals.append(item)
        elif key.startswith("sample."):
            sample.append(item)
        else:
            raise ConfigError(f"'{key}' cannot be changed when evaluating; only eval.* and sample.* keys can.")
    settings = build_typed(EvalSettings, apply_overrides({}, evals).get("eval", {}), "eval.")
    validate_settings(settings)
    return settings, sample


# ---------------------------------------------------------------------------------------------
# Pluggable feature extractors


@runtime_checkable
class FeatureExtractor(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] in [-1, 1] -> [N, D]
        ...


@runtime_checkable
class Classifier(FeatureExtractor, Protocol):
    num_classes: int

    def predict(self, images: torch.Tensor) -> torch.Tensor:  # [N] int64 class indices
        ...


def load_extractor(spec: str, image_size: int, in_channels: int) -> FeatureExtractor:
    """Import `module:factory` and call `factory(image_size=..., in_channels=...)`."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import the feature extractor {spec!r} ({exc}); check eval.extractor and PYTHONPATH.") from None
    extractor = factory(image_size=image_size, in_channels=in_channels)
    if not callable(extractor):
        raise UserError(f"{spec} returned {type(extractor).__name__}, not a callable images -> features.")
    return extractor


# ---------------------------------------------------------------------------------------------
# The default extractor: a small CNN trained on the digits training split


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
        with cpu_threads(1):
            return torch.cat([self.net.body(b) for b in _batches(images)]) * self.scale

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with cpu_threads(1):
            return torch.cat([self.net(b).argmax(1) for b in _batches(images)])


@contextlib.contextmanager
def cpu_threads(count: int):
    """Use `count` torch CPU threads inside the block (0: leave as is).

    Small networks on a busy 2-core machine ran many times faster on one thread than on two
    spinning OpenMP threads (classifier training: 4 s instead of 40 s); one thread also makes
    the cached classifier independent of the machine's core count.
    """
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(images: torch.Tensor, size: int = 500):
    images = images.float().cpu()
    return (images[i : i + size] for i in range(0, len(images), size))


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gn_diffusion")


def digits_classifier(image_size: int, cache: str | os.PathLike | None = None,
                      recipe: ClassifierRecipe = ClassifierRecipe()) -> DigitsClassifier:
    """The digits classifier at `image_size`, loaded from the cache or trained (and cached)."""
    from safetensors.torch import load_file, save_file

    train_x, train_y = digits_arrays("train", image_size)
    test_x, test_y = digits_arrays("test", image_size)
    net = DigitsCNN()
    path = cache_dir(cache) / f"digits_cnn-{image_size}px-{_content_hash(net, recipe, train_x, train_y)}.safetensors"
    try:
        net.load_state_dict(load_file(path))
    except Exception:  # missing, truncated or stale: our own cache file, so retrain and replace it
        _train_classifier(net, train_x, train_y, recipe)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return DigitsClassifier(net, train_x, (test_x, test_y))


def _content_hash(net: nn.Module, recipe: ClassifierRecipe, images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(repr(net).encode())
    h.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]


def _train_classifier(net: DigitsCNN, images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe) -> None:
    with torch.random.fork_rng(devices=[]), cpu_threads(1):  # a fixed seed; the caller's RNG is untouched
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


# ---------------------------------------------------------------------------------------------
# The scores


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [N, D], in float64.

    tr((S_a S_b)^1/2) is the sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2,
    a symmetric PSD matrix: unlike sqrtm of the non-symmetric S_a S_b, no complex parts to discard.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
    return float(max(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root, 0.0))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, *, subsets: int = 100, subset_size: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """Mean and std over random subsets of the unbiased MMD^2 with kernel (x.y / D + 1)^3."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        values.append(_mmd2_unbiased(x, y))
    return float(np.mean(values)), float(np.std(values))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    k_xx, k_yy, k_xy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diagonal - 2 * k_xy.mean())


def class_counts(predicted: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(predicted, np.int64), minlength=num_classes)[:num_classes]


def kl_from_uniform(counts: np.ndarray) -> float:
    """KL(p || uniform) in nats of the predicted-class histogram: 0 when balanced, log K for one class."""
    p = counts / counts.sum()
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] * len(p))))


def class_coverage(counts: np.ndarray, share: float = 0.25) -> float:
    """Fraction of classes predicted at least max(1, share * N / K) times: a class the generator
    draws only by a stray sample or two does not count as covered."""
    needed = max(1.0, share * counts.sum() / len(counts))
    return float(np.mean(counts >= needed))


def per_class_accuracy(predicted: np.ndarray, requested: np.ndarray, num_classes: int) -> dict[int, float]:
    """For each requested class, the fraction of its images the classifier assigns to it."""
    return {c: float(np.mean(predicted[requested == c] == c)) for c in range(num_classes) if np.any(requested == c)}


@dataclass
class Scores:
    num_images: int
    frechet: float
    kid: float
    kid_std: float
    coverage: Optional[float] = None
    kl_uniform: Optional[float] = None
    accuracy: Optional[float] = None  # class-conditional samples: mean over the requested classes
    class_accuracy: dict[int, float] = field(default_factory=dict)


@dataclass
class Report:
    samples: Scores
    floor: Scores
    extractor: str
    classifier_accuracy: Optional[float] = None  # the classifier on the held-out real split

    @property
    def frechet_ratio(self) -> float:
        return self.samples.frechet / max(self.floor.frechet, 1e-12)

    def to_dict(self) -> dict:
        return {**asdict(self), "frechet_ratio": self.frechet_ratio}

    def format(self) -> str:
        rows = [
            ("Frechet distance", self.samples.frechet, self.floor.frechet, "{:.3f}"),
            ("KID x 1e3", 1e3 * self.samples.kid, 1e3 * self.floor.kid, "{:.3f}"),
            ("class coverage", self.samples.coverage, self.floor.coverage, "{:.2f}"),
            ("KL(classes || uniform)", self.samples.kl_uniform, self.floor.kl_uniform, "{:.4f}"),
            ("accuracy on requested class", self.samples.accuracy, self.floor.accuracy, "{:.3f}"),
        ]
        rows += [(f"  accuracy, class {c}", acc, self.floor.class_accuracy.get(c), "{:.3f}")
                 for c, acc in sorted(self.samples.class_accuracy.items())]
        head = f"{'metric':<30}{'samples':>12}{'floor':>12}"
        lines = [
            f"features: {self.extractor}"
            + (f" (held-out accuracy {self.classifier_accuracy:.3f})" if self.classifier_accuracy is not None else ""),
            f"samples: {self.samples.num_images} generated; floor: {self.floor.num_images} real training "
            "images; both against the held-out real split",
            head, "-" * len(head),
        ]
        lines += [f"{name:<30}{_fmt(s, spec):>12}{_fmt(f, spec):>12}" for name, s, f, spec in rows if s is not None]
        lines.append(f"Frechet distance is {self.frechet_ratio:.2f}x the floor")
        return "\n".join(lines)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else spec.format(value)


class Evaluator:
    """Scores sets of images against a fixed real reference, beside the real-data floor.

    `reference` is the held-out real split; `floor_images` (with their true labels, if any) is the
    pool the floor draws its real images from, the same count as the images being scored.
    """

    def __init__(self, extractor: FeatureExtractor, reference: torch.Tensor, floor_images: torch.Tensor,
                 floor_labels: Optional[torch.Tensor] = None, settings: EvalSettings = EvalSettings(),
                 name: Optional[str] = None):
        self.extractor = extractor
        self.settings = settings
        self.name = name or getattr(extractor, "name", type(extractor).__name__)
        self.reference_features = self._features(reference)
        self.floor_images, self.floor_labels = floor_images, floor_labels
        self._floors: dict[tuple[int, bool], Scores] = {}

    @property
    def classifies(self) -> bool:
        return isinstance(self.extractor, Classifier)

    def score(self, images: torch.Tensor, requested: Optional[torch.Tensor] = None) -> Scores:
        """Scores of `images`; `requested` [N] holds each image's asked-for class (-1: none)."""
        if len(images) < 2:
            raise UserError(f"got {len(images)} image(s) to evaluate; generate at least 2 (eval.num_samples).")
        s = self.settings
        features = self._features(images)
        kid, kid_std = kernel_inception_distance(features, self.reference_features, subsets=s.kid_subsets,
                                                 subset_size=s.kid_subset_size, seed=s.seed)
        scores = Scores(len(images), frechet_distance(features, self.reference_features), kid, kid_std)
        if self.classifies:
            self._add_class_scores(scores, images, requested)
        return scores

    def floor(self, num_images: int, conditional: bool = False) -> Scores:
        """Scores of `num_images` real training images (all of them if fewer), cached per count."""
        key = (num_images, conditional)
        if key not in self._floors:
            n = min(num_images, len(self.floor_images))
            pick = torch.from_numpy(np.random.default_rng(self.settings.seed).permutation(len(self.floor_images))[:n])
            labels = self.floor_labels[pick] if conditional and self.floor_labels is not None else None
            self._floors[key] = self.score(self.floor_images[pick], labels)
        return self._floors[key]

    def report(self, images: torch.Tensor, requested: Optional[torch.Tensor] = None) -> Report:
        conditional = requested is not None and bool((requested >= 0).any())
        return Report(
            samples=self.score(images, requested if conditional else None),
            floor=self.floor(len(images), conditional),
            extractor=self.name,
            classifier_accuracy=getattr(self.extractor, "held_out_accuracy", None),
        )

    def _features(self, images: torch.Tensor) -> np.ndarray:
        features = torch.as_tensor(self.extractor(images)).detach().cpu().double().reshape(len(images), -1)
        if not torch.isfinite(features).all():
            raise UserError(f"the feature extractor {self.name} returned NaN or infinite features; check the images are finite and in [-1, 1].")
        return features.numpy()

    def _add_class_scores(self, scores: Scores, images: torch.Tensor, requested: Optional[torch.Tensor]) -> None:
        k = self.extractor.num_classes
        predicted = self.extractor.predict(images).cpu().numpy()
        counts = class_counts(predicted, k)
        scores.coverage = class_coverage(counts, self.settings.coverage_share)
        scores.kl_uniform = kl_from_uniform(counts)
        if requested is not None:
            requested = requested.cpu().numpy()
            keep = requested >= 0
            scores.class_accuracy = per_class_accuracy(predicted[keep], requested[keep], k)
            scores.accuracy = float(np.mean(list(scores.class_accuracy.values())))


def digits_evaluator(image_size: int, settings: EvalSettings = EvalSettings(),
                     extractor: Optional[FeatureExtractor] = None, name: Optional[str] = None) -> Evaluator:
    """An Evaluator on the digits: held-out split as the reference, training split as the floor pool."""
    extractor = extractor or digits_classifier(image_size, settings.cache_dir)
    reference, _ = digits_arrays("test", image_size)
    train_images, train_labels = digits_arrays("train", image_size)
    return Evaluator(extractor, reference, train_images, train_labels, settings, name)



def evaluator_for(cfg: Config, settings: EvalSettings) -> Evaluator:
    """The Evaluator for a run's data.

    Digits: the held-out split is the reference and the training split the floor's pool, with the
    digits classifier or a plugged extractor. An image folder: the user's held-out folder
    (eval.reference_dir) is the reference and the training folder the pool, with a plugged extractor.
    """
    m = cfg.model
    extractor = load_extractor(settings.extractor, m.image_size, m.in_channels) if settings.extractor else None
    if cfg.data.dataset == "digits":
        return digits_evaluator(m.image_size, settings, extractor, name=settings.extractor)
    if extractor is None or settings.reference_dir is None:
        raise UserError(
            "a model trained on an image folder is scored with features of your choice against held-out images "
            "it never saw: set eval.extractor=MODULE:FACTORY and eval.reference_dir=FOLDER."
        )
    from .data import image_folder_arrays

    def folder_images(path: str) -> torch.Tensor:
        images, _, _ = image_folder_arrays(path, m.image_size, m.in_channels, class_labels=False)
        return from_uint8(images)

    return Evaluator(extractor, folder_images(settings.reference_dir), folder_images(cfg.data.path),
                     settings=settings, name=settings.extractor)


def sample_and_report(model, cfg: Config, evaluator: Evaluator, num_samples: int, *, progress: bool = True) -> Report:
    """Generate `num_samples` images with the run's sampling settings and score them.

    A class-conditional model with no sample.class_labels is asked for every class in turn, so
    each class gets its accuracy.
    """
    from .sampling import generate

    cfg = copy.deepcopy(cfg)
    cfg.sample.num_images = num_samples
    if cfg.model.num_classes and not cfg.sample.class_labels:
        cfg.sample.class_labels = list(range(cfg.model.num_classes))
    images, labels = generate(model, cfg, progress=progress)
    return evaluator.report(images, labels)
