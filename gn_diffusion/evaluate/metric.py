"""Scoring sets of images against a fixed real reference, each score beside its floor.

The floor is the same score for real training images of the same count against the same
held-out reference: what a perfect generator would get. The Evaluator takes images; making them
is the caller's (`sample.generate.generate(model, every_class_once(cfg, n))`).

Any feature extractor plugs in: a callable `images [N, C, H, W] in [-1, 1] -> features [N, D]`.
If it also has `predict(images) -> class indices [N]` and an integer `num_classes`, the class
statistics (coverage, KL from uniform, per-class accuracy) are computed too. The default is
the digits classifier (`digits_classifier`); eval.extractor=classifier trains the same CNN, with
the recipe scaled to the data, on any labelled training data (`classifier_evaluator`).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Optional, Protocol, runtime_checkable

import numpy as np
import torch

from ..config import Config, EvalConfig
from ..data.dataset import digits_arrays
from ..errors import UserError, file_system_sentence
from ..images import from_uint8
from .classifier import trained_classifier
from .digits import digits_classifier
from .scores import (Scores, class_counts, class_coverage, frechet_distance, kernel_inception_distance,
                     kl_from_uniform, per_class_accuracy)


CLASSIFIER = "classifier"  # eval.extractor: the package's CNN trained on the run's own labelled data


@runtime_checkable
class FeatureExtractor(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] in [-1, 1] -> [N, D]
        ...


@runtime_checkable
class Classifier(FeatureExtractor, Protocol):
    num_classes: int

    def predict(self, images: torch.Tensor) -> torch.Tensor:  # [N] int64 class indices
        ...


def load_extractor(spec: str, image_size: int, in_channels: int, settings: EvalConfig = EvalConfig(),
                   cpu: bool = False) -> FeatureExtractor:
    """Import `module:factory` and call `factory(image_size=..., in_channels=...)`; the spec
    "inception" is FID's Inception-v3 pool3 features (inception.py), with eval.inception_* (`settings`)."""
    if spec == "inception":
        from .inception import inception_extractor  # torch-fidelity is an extra: imported only when asked for

        return inception_extractor(settings.inception_weights, settings.inception_batch_size, cpu=cpu)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import the feature extractor {spec!r} ({exc}); check eval.extractor and PYTHONPATH.") from None
    extractor = factory(image_size=image_size, in_channels=in_channels)
    if not callable(extractor):
        raise UserError(f"{spec} returned {type(extractor).__name__}, not a callable images -> features.")
    return extractor


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
        head = f"{'metric':<30}{'samples':>12}{'floor':>12}"
        lines = [*self._preamble(), head, "-" * len(head)]
        lines += [f"{name:<30}{_fmt(s, spec):>12}{_fmt(f, spec):>12}" for name, s, f, spec in self._rows() if s is not None]
        lines.append(f"Frechet distance is {self.frechet_ratio:.2f}x the floor")
        return "\n".join(lines)

    def _preamble(self) -> list[str]:
        accuracy = self.classifier_accuracy
        return [
            f"features: {self.extractor}" + (f" (held-out accuracy {accuracy:.3f})" if accuracy is not None else ""),
            f"samples: {self.samples.num_images} generated; floor: {self.floor.num_images} real training "
            "images; both against the held-out real split",
        ]

    def _rows(self) -> list[tuple[str, Optional[float], Optional[float], str]]:
        s, f = self.samples, self.floor
        rows = [
            ("Frechet distance", s.frechet, f.frechet, "{:.3f}"),
            ("KID x 1e3", 1e3 * s.kid, 1e3 * f.kid, "{:.3f}"),
            ("  std over KID subsets x 1e3", 1e3 * s.kid_std, 1e3 * f.kid_std, "{:.1f}"),  # often larger than KID itself
            ("class coverage", s.coverage, f.coverage, "{:.2f}"),
            ("KL(classes || uniform)", s.kl_uniform, f.kl_uniform, "{:.4f}"),
            ("accuracy on requested class", s.accuracy, f.accuracy, "{:.3f}"),
        ]
        return rows + [(f"  accuracy, class {c}", acc, f.class_accuracy.get(c), "{:.3f}")
                       for c, acc in sorted(s.class_accuracy.items())]


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else spec.format(value)


class Evaluator:
    """Scores sets of images against a fixed real reference, beside the real-data floor.

    `reference` is the held-out real split; `floor_images` (with their true labels, if any) is the
    pool the floor draws its real images from, the same count as the images being scored.
    """

    def __init__(self, extractor: FeatureExtractor, reference: torch.Tensor, floor_images: torch.Tensor,
                 floor_labels: Optional[torch.Tensor] = None, settings: EvalConfig = EvalConfig(),
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
            raise UserError(f"got {len(images)} image(s) to evaluate; generate at least 2 (eval.num_images).")
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

    def report(self, images: torch.Tensor, requested: Optional[torch.Tensor] = None,
               made_by: str = "the model") -> Report:
        """Scores of `images` (with their requested classes, -1 for none) beside the floor;
        `made_by` names the model that generated them, blamed if they are not finite."""
        check_samples_finite(images, made_by)
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
            raise UserError(f"the feature extractor {self.name} returned NaN or infinite features of finite images; "
                            "fix it or choose another (eval.extractor).")
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


def check_samples_finite(images: torch.Tensor, made_by: str) -> None:
    """Refuse generated images with a NaN or an infinity, naming the model that made them: with its
    weights checked finite on loading (run_folder.weights.load_weights), its sampling overflowed."""
    bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
    if bad:
        raise UserError(f"{made_by} generated {bad} of {len(images)} images with NaN or infinite pixels, which cannot "
                        "be scored (the model is at fault, not the feature extractor: its sampling overflows); "
                        "retrain it (a lower train.lr, or train.grad_clip) and evaluate again.")


def digits_evaluator(image_size: int, settings: EvalConfig = EvalConfig(),
                     extractor: Optional[FeatureExtractor] = None, name: Optional[str] = None) -> Evaluator:
    """An Evaluator on the digits: held-out split as the reference, training split as the floor pool."""
    extractor = extractor or digits_classifier(image_size, settings.cache_dir)
    reference, _ = digits_arrays("test", image_size)
    train_images, train_labels = digits_arrays("train", image_size)
    return Evaluator(extractor, reference, train_images, train_labels, settings, name)


def evaluator_for(cfg: Config) -> Evaluator:
    """The Evaluator for a run's data, with the run's eval settings (cfg.eval). A plugged
    extractor's own failure (its import's SyntaxError, its factory raising, its features not a
    tensor of N rows) is one sentence: it is the user's code to fix."""
    try:
        return _evaluator_for(cfg)
    except UserError:
        raise
    except Exception as exc:
        if cfg.eval.extractor is None or file_system_sentence(exc) is not None:
            raise
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever it printed
        raise UserError(f"the feature extractor {cfg.eval.extractor} failed ({detail}); fix it (its factory must "
                        "return a callable images [N, C, H, W] -> features [N, D]) or unset eval.extractor.") from None


def _evaluator_for(cfg: Config) -> Evaluator:
    """evaluator_for without the guard.

    Digits: the held-out split is the reference and the training split the floor's pool, with the
    digits classifier or a plugged extractor. An image folder or an hf data set: held-out images
    (eval.reference_split of data.path for hf, else the folder eval.reference_dir) are the
    reference and the training data the pool, with a plugged extractor. The pool is read lazily:
    the floor decodes only the images it draws.
    """
    m, settings = cfg.model, cfg.eval
    plugged = settings.extractor not in (None, CLASSIFIER)
    extractor = load_extractor(settings.extractor, m.image_size, m.in_channels, settings, cpu=cfg.runtime.cpu) if plugged else None
    if cfg.data.dataset == "digits":  # eval.extractor=classifier is the default there: the digits classifier
        return digits_evaluator(m.image_size, settings, extractor, name=settings.extractor if plugged else None)
    hf = cfg.data.dataset == "hf"
    if settings.extractor == CLASSIFIER and (settings.reference_dir or (hf and settings.reference_split)):
        return classifier_evaluator(cfg)
    if extractor is None or (settings.reference_dir is None and not (hf and settings.reference_split)):
        held_out = "eval.reference_split=SPLIT (or eval.reference_dir=FOLDER)" if hf else "eval.reference_dir=FOLDER"
        raise UserError(
            f"a model trained on {'an hf data set' if hf else 'an image folder'} is scored with features of your "
            f"choice against held-out images it never saw: set eval.extractor=MODULE:FACTORY (or classifier, "
            f"for labelled data) and {held_out}."
        )
    pool, pool_labels = _training_pool(cfg)
    return Evaluator(extractor, _reference_images(cfg), pool, pool_labels, settings=settings, name=settings.extractor)


def classifier_evaluator(cfg: Config) -> Evaluator:
    """eval.extractor=classifier: the CNN trained on the run's labelled training data (all of it,
    in memory), its accuracy measured on the labelled held-out images; those are the reference,
    and the training data the floor's pool."""
    train_images, train_labels, classes = _labelled(cfg, held_out=False)
    reference, reference_labels, _ = _labelled(cfg, held_out=True, classes=classes)
    extractor = trained_classifier((train_images, train_labels), (reference, reference_labels), len(classes),
                                   cfg.eval.cache_dir)
    return Evaluator(extractor, reference, train_images, train_labels, cfg.eval, name=f"{CLASSIFIER} ({extractor.name})")


def _labelled(cfg: Config, held_out: bool, classes: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Float images, labels and class names of the training data or of the held-out images, whose
    classes are mapped by name onto the training data's (`classes`)."""
    d, m = cfg.data, cfg.model
    if d.dataset == "hf" and (not held_out or cfg.eval.reference_split):
        from ..data.hf_source import hf_source

        split = {"split": cfg.eval.reference_split, "key": "eval.reference_split", "whole_ok": False} if held_out else {}
        if d.label_column is None and not held_out:
            _require_class_label(d)
        source, count = hf_source(d, m.image_size, m.in_channels, use_labels=True, **split)
        names = classes or list(range(count))
        if held_out and int(source.labels.max()) >= len(names):
            raise UserError(f"eval.reference_split={cfg.eval.reference_split} has labels up to {int(source.labels.max())} "
                            f"but {d.path} ({d.split}) has {len(names)} classes; hold out a split of the same classes.")
        return from_uint8(source.read_all()), source.labels, names
    from ..data.dataset import folder_source

    root = cfg.eval.reference_dir if held_out else d.path
    source, names = folder_source(root, m.image_size, m.in_channels, True, d.max_image_pixels)
    labels = source.labels
    if classes is not None:
        unknown = sorted(set(names) - set(map(str, classes)))
        if unknown:
            raise UserError(f"eval.reference_dir={root} has class sub-folders {unknown} that {d.path} lacks; "
                            "give the held-out images the training data's class sub-folders.")
        labels = torch.tensor([list(map(str, classes)).index(n) for n in names], dtype=torch.int64)[labels]
    return from_uint8(source.read_all()), labels, names


def _require_class_label(d) -> None:
    import datasets

    from ..data.hf_source import open_split

    if not any(isinstance(f, datasets.ClassLabel) for f in open_split(d.path, d.split, "data.split").features.values()):
        raise UserError(f"eval.extractor=classifier trains on the data's labels but {d.path} has no ClassLabel column; "
                        "set data.label_column, or for unlabelled data eval.extractor=inception or a module:factory.")


def _reference_images(cfg: Config) -> torch.Tensor:
    """The held-out images, all in memory as float: every one of them is scored."""
    if cfg.data.dataset == "hf" and cfg.eval.reference_split:
        from ..data.hf_source import hf_source

        source, _ = hf_source(cfg.data, cfg.model.image_size, cfg.model.in_channels, use_labels=False,
                              split=cfg.eval.reference_split, key="eval.reference_split", whole_ok=False)
        return from_uint8(source.read_all())
    return _folder_images(cfg.eval.reference_dir, cfg)


def _training_pool(cfg: Config):
    """The training data as lazily decoded float images, and its labels (None when unused)."""
    from ..data.dataset import build_dataset
    from ..data.sources import FloatImages

    source = build_dataset(cfg)
    return FloatImages(source), source.labels if cfg.model.num_classes else None


def _folder_images(path: str, cfg: Config) -> torch.Tensor:
    from ..data.dataset import image_folder_arrays

    images, _, _ = image_folder_arrays(path, cfg.model.image_size, cfg.model.in_channels, class_labels=False,
                                       max_pixels=cfg.data.max_image_pixels)
    return from_uint8(images)
