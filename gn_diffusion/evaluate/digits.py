"""The default feature extractor: the package's small CNN (classifier.py) trained on the digits'
training split, with its held-out split for the accuracy. FID's Inception weights cannot be
downloaded here, so the digits are scored with features of this network instead."""

from __future__ import annotations

import os

from ..data.dataset import DIGITS_CLASSES, digits_arrays
from .classifier import ClassifierRecipe, TrainedClassifier, trained_classifier


def digits_classifier(image_size: int, cache: str | os.PathLike | None = None,
                      recipe: ClassifierRecipe | None = None) -> TrainedClassifier:
    """The digits classifier at `image_size`, loaded from the cache or trained (and cached);
    `recipe` defaults to recipe_for(1500 images): 20 epochs."""
    return trained_classifier(digits_arrays("train", image_size), digits_arrays("test", image_size), DIGITS_CLASSES,
                              cache, recipe, name="digits-cnn", file_prefix="digits_cnn")
