"""Scoring a trained last layer on held-out images: accuracy, the confusion matrix, per-class scores."""

from __future__ import annotations

import numpy as np

from lastlayer.train import Classifier


def accuracy(clf: Classifier, x: np.ndarray, y: np.ndarray) -> float | None:
    """Share of rows of ``x`` ``[N, D]`` whose predicted class is ``y`` ``[N]``; ``None`` when N = 0."""
    return float(np.mean(clf.predict(x) == y)) if len(y) else None


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
