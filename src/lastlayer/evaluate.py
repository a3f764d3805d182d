"""Scoring a trained last layer on held-out images: accuracy, balanced accuracy, macro-F1, the confusion
matrix, per-class scores, and the folds and summary of a cross-validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def accuracy(predicted: np.ndarray, truth: np.ndarray) -> float | None:
    """Share of the ``predicted`` classes ``[N]`` that are the ``truth`` ``[N]``; ``None`` when N = 0."""
    return float(np.mean(predicted == truth)) if len(truth) else None


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``int64 [C, C]``: row = true class, column = predicted class."""
    out = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(out, (truth, predicted), 1)
    return out


def per_class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall ``[C]`` from a confusion matrix (NaN where undefined)."""
    tp = np.diag(confusion).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / confusion.sum(axis=0)
        recall = tp / confusion.sum(axis=1)
    return precision, recall


def balanced_accuracy(confusion: np.ndarray) -> float | None:
    """Mean recall over the classes that have images (``None`` without images): the accuracy each
    class would give if all were equally frequent."""
    support = confusion.sum(axis=1)
    if not support.any():
        return None
    return float(np.mean(np.diag(confusion)[support > 0] / support[support > 0]))


def macro_f1(confusion: np.ndarray) -> float | None:
    """Mean F1 over the classes that have images or predictions (F1 = 0 for a class never found)."""
    tp = np.diag(confusion).astype(np.float64)
    either = confusion.sum(axis=1) + confusion.sum(axis=0)
    if not either.any():
        return None
    return float(np.mean(2 * tp[either > 0] / either[either > 0]))


def largest_share(labels: np.ndarray, n_classes: int) -> float | None:
    """Share of the most frequent class in ``labels`` ``[N]``: the accuracy of always answering it."""
    return float(np.bincount(labels, minlength=n_classes).max() / len(labels)) if len(labels) else None


def folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``int64 [N]`` fold (0..k-1) of each position: each class dealt out in turn over a seeded
    shuffle, so every fold has each class's share (stratified)."""
    rng = np.random.default_rng([seed, k])
    out = np.empty(len(labels), np.int64)
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (start + np.arange(len(members))) % k
        start += len(members)
    return out


@dataclass(frozen=True)
class Spread:
    """Mean and standard deviation (over folds) of one score, shares in [0, 1]."""

    mean: float
    std: float


@dataclass(frozen=True)
class CrossValidation:
    """Scores of a K-fold cross-validation of the last layer on the cached features.

    Attributes:
        folds: K.
        images: images scored (each once, in the fold that held it out).
        accuracy, balanced_accuracy, macro_f1: over the folds.
        largest_class_share: the accuracy of always answering the largest class.
    """

    folds: int
    images: int
    accuracy: Spread
    balanced_accuracy: Spread
    macro_f1: Spread
    largest_class_share: float

    @classmethod
    def of(cls, confusions: Sequence[np.ndarray], largest: float) -> CrossValidation:
        """The summary of one confusion matrix per fold."""

        def spread(values: list[float | None]) -> Spread:
            kept = np.array([v for v in values if v is not None], np.float64)
            return Spread(round(float(kept.mean()), 6), round(float(kept.std()), 6))

        return cls(
            len(confusions),
            int(sum(c.sum() for c in confusions)),
            spread([float(np.trace(c) / c.sum()) if c.sum() else None for c in confusions]),
            spread([balanced_accuracy(c) for c in confusions]),
            spread([macro_f1(c) for c in confusions]),
            round(largest, 6),
        )
