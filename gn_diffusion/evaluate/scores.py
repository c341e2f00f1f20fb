"""Sample-quality scores of feature sets and class predictions: pure numpy, no model, no data.

Frechet distance and KID compare two sets of features [N, D]; the class statistics read a
classifier's predicted labels. `Scores` holds one image set's results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


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
