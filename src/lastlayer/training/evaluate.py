"""Scoring a trained last layer on held-out images: accuracy, balanced accuracy, macro-F1, the confusion
matrix, per-class scores, and the folds and summary of a cross-validation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lastlayer.dataset import TESTING, TRAINING, VALIDATION

if TYPE_CHECKING:
    from lastlayer.bottlenecks.passes import Predictions
    from lastlayer.dataset import ImageSet
    from lastlayer.settings.run import OutputConfig
    from lastlayer.training.data import TrainingData
    from lastlayer.training.train import Classifier

log = logging.getLogger("lastlayer.retrain")


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


@dataclass(frozen=True)
class Scores:
    """How the classifier does on held-out images.

    Attributes:
        test_accuracy, test_n: on the ``--test_batch_size`` test images (all by default).
        accuracy_all: split to accuracy on the whole split; ``"held_out"`` for validation + test.
        held_out_n: validation + test images.
        confusion: ``int64 [C, C]`` on the whole test split.
        balanced_accuracy, macro_f1: on the whole test split.
        largest_class, largest_share: the whole test split's most frequent class and its share.
        test: the predictions for the whole test split.
    """

    test_accuracy: float | None
    test_n: int
    accuracy_all: dict[str, float | None]
    held_out_n: int
    confusion: np.ndarray
    balanced_accuracy: float | None
    macro_f1: float | None
    largest_class: int | None
    largest_share: float | None
    test: Predictions


def evaluate(
    clf: Classifier,
    data: TrainingData,
    images: ImageSet,
    test_batch_size: int,
    seed: int,
    outputs: OutputConfig,
) -> Scores:
    """Score ``clf`` on the test images (retrain.py's "Final test accuracy"), on each whole split and
    on validation + test (one pass over the cache); log the misclassified test images when asked.
    With distortions on, the training split is scored on its images' first variants (those training
    drew)."""
    test, predicted = _predict_splits(clf, data)
    full_y = data.labels[TESTING]
    test_pred, test_y, test_positions = test.predicted, full_y, data.index[TESTING]
    if test_batch_size != -1 and len(test_y):
        pick = np.random.default_rng(seed + 1).integers(0, len(test_y), test_batch_size)
        test_pred, test_y, test_positions = test_pred[pick], test_y[pick], test_positions[pick]
    test_accuracy = accuracy(test_pred, test_y)
    if test_accuracy is None:
        log.warning("The test set is empty: no final test accuracy (raise --testing_percentage)")
    else:
        log.info("Final test accuracy = %.1f%% (N=%d)", test_accuracy * 100, len(test_y))
    if outputs.print_misclassified_test_images:
        log.info("=== MISCLASSIFIED TEST IMAGES ===")
        wrong = np.flatnonzero(test_pred != test_y)
        for f, pred in zip(images.files.at(test_positions[wrong]), test_pred[wrong].tolist(), strict=True):
            log.info("%70s  %s", f.url, images.labels[pred])
    held_out = [np.concatenate([predicted[s][i] for s in (VALIDATION, TESTING)]) for i in (0, 1)]
    confusion = confusion_matrix(full_y, test.predicted, len(images.labels))
    balanced, f1, biggest, largest = _class_balance(confusion, images.labels)
    return Scores(
        test_accuracy,
        len(test_y),
        {
            **{split: accuracy(p, truth) for split, (p, truth) in predicted.items()},
            "held_out": accuracy(*held_out),
        },
        len(held_out[1]),
        confusion,
        balanced,
        f1,
        biggest,
        largest,
        test,
    )


def _predict_splits(
    clf: Classifier, data: TrainingData
) -> tuple[Predictions, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """From one pass: the test split's predictions, and each split's predicted and true classes (of
    the images with features: with distortions on, the training images that training draws)."""
    kept = {s: data.bottlenecks.first_rows(data.index[s]) >= 0 for s in (TRAINING, VALIDATION, TESTING)}
    positions = np.concatenate([data.index[s][kept[s]] for s in kept])
    truth = np.concatenate([data.labels[s][kept[s]] for s in kept])
    predictions = data.predict([clf], positions, truth, np.zeros(len(positions), np.int64))
    bounds = np.cumsum([0, *(int(k.sum()) for k in kept.values())])
    split = {s: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(kept)}
    return predictions[split[TESTING]], {s: (predictions.predicted[at], truth[at]) for s, at in split.items()}


def _class_balance(
    confusion: np.ndarray, labels: tuple[str, ...]
) -> tuple[float | None, float | None, int | None, float | None]:
    """Balanced accuracy, macro-F1, the most frequent class and its share on the split of
    ``confusion`` (all ``None`` when it is empty); logged beside the accuracy."""
    support = confusion.sum(axis=1)
    if not support.any():
        return None, None, None, None
    balanced, f1 = balanced_accuracy(confusion), macro_f1(confusion)
    biggest = int(np.argmax(support))
    share = float(support[biggest] / support.sum())
    log.info(
        "Balanced accuracy = %.1f%%, macro-F1 = %.1f%% (N=%d); always answering the largest class "
        "(%s) would score %.1f%%",
        100 * (balanced or 0.0),
        100 * (f1 or 0.0),
        support.sum(),
        labels[biggest],
        100 * share,
    )
    return balanced, f1, biggest, share
