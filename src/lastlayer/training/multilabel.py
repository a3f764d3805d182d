"""``--multi_label``: one sigmoid per label on the cached features, per-label thresholds, and its scores.

Training is :func:`~lastlayer.training.train.train`'s with the loss changed: the same seeded batch
positions (so the cache pass before training reads the same rows), distorted variants, standardization
folded into the weights, learning rate and evaluation points; each step descends the mean over the
batch of the summed binary cross-entropy of ``sigmoid(x W + b)`` against the multi-hot labels. The
evaluation points report the exact-match ratio (every label right at 0.5) as the "accuracy".

Thresholds are chosen per label on the validation split (halfway below the score that gives the best
F1, as a margin for unseen images), never below
:data:`THRESHOLD_FLOOR`; a label with fewer than :data:`MIN_POSITIVES` validation images keeps
:data:`DEFAULT_THRESHOLD` (one or two images would fit a threshold to themselves). Scores (numpy, no
scikit-learn in the run-time dependencies): average precision per label as scikit-learn defines it
(precision at each positive's rank, averaged), mAP over the labels with test images, micro- and
macro-F1, per-label precision/recall/support, and the exact-match ratio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer.bottlenecks.passes import LOGITS_BYTES, Predictions, class_logits
from lastlayer.dataset import TESTING, TRAINING, VALIDATION
from lastlayer.errors import DataError
from lastlayer.training.data import final_fit
from lastlayer.training.evaluate import Scores, confusion_matrix
from lastlayer.training.train import (
    Classifier,
    Evaluation,
    batch_positions,
    evaluates,
    truncated_normal,
    validation_positions,
)

if TYPE_CHECKING:
    from lastlayer.bottlenecks.needs import Bottlenecks
    from lastlayer.dataset import ImageSet
    from lastlayer.settings.run import TrainingConfig
    from lastlayer.training.data import Fit, TrainingData

log = logging.getLogger("lastlayer.retrain")
train_log = logging.getLogger("lastlayer.train")

#: A label's threshold where the validation split has too few of its images to choose one.
DEFAULT_THRESHOLD = 0.5
#: Validation images of a label needed to choose its threshold.
MIN_POSITIVES = 3
#: The lowest threshold chosen (a rare label's best F1 can sit at a tiny score).
THRESHOLD_FLOOR = 0.1


@dataclass(frozen=True)
class LabelScores:
    """One label's scores on the test split (``None`` where undefined)."""

    precision: float | None
    recall: float | None
    f1: float | None
    average_precision: float | None
    support: int
    threshold: float


@dataclass(frozen=True)
class MultiLabelScores:
    """The test split's multi-label scores (shares in [0, 1], ``None`` without test images)."""

    mean_average_precision: float | None
    micro_f1: float | None
    macro_f1: float | None
    exact_match: float | None
    test_n: int
    per_label: dict[str, LabelScores]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MultiLabel:
    """What the multi-label stage gives the run: the classifier, its thresholds ``float32 [L]``, the
    summary's :class:`Scores` (see :func:`fit_and_score`) and the multi-label scores."""

    classifier: Classifier
    thresholds: np.ndarray
    scores: Scores
    multi: MultiLabelScores


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow."""
    return np.exp(-np.logaddexp(0.0, -z)).astype(np.float32)


def binary_cross_entropy(logits: np.ndarray, hot: np.ndarray) -> float:
    """Mean over images and labels of the binary cross-entropy (nats) of ``logits`` ``[N, L]``."""
    return float(np.mean(np.logaddexp(0.0, logits) - hot * logits)) if logits.size else 0.0


def exact_match(predicted: np.ndarray, hot: np.ndarray) -> float | None:
    """Share of rows of ``predicted`` ``bool [N, L]`` equal to ``hot``; ``None`` when N = 0."""
    return float(np.mean((predicted == hot).all(axis=1))) if len(hot) else None


def train_sigmoid(
    data: TrainingData,
    fit: Fit,
    hot: np.ndarray,
    on_eval: Callable[[Evaluation], None] | None = None,
) -> Classifier:
    """Train one sigmoid per label of ``hot`` (``bool [N_images, L]``, rows by image position) on
    ``fit``'s batches; returns the classifier on raw features."""
    config = fit.config
    scaler, train_x, val_x = data.feeds(fit)
    rng = np.random.default_rng(config.seed)
    n_labels = hot.shape[1]
    clf = Classifier(
        truncated_normal(rng, 0.001, (data.bottlenecks.dim, n_labels)), np.zeros(n_labels, np.float32)
    )
    next_batch = batch_positions(fit.labels, data.classes, config)
    next_val = validation_positions(fit.val_labels, data.classes, config)
    train_hot, val_hot = hot[fit.positions].astype(np.float32), hot[fit.val_positions]
    lr = np.float32(config.learning_rate)
    for step in range(config.steps):
        positions = next_batch()
        x, y = train_x(positions, rng), train_hot[positions]
        grad = (sigmoid(scaler.fold(clf, np.float32).logits(x)) - y) / len(y)
        clf.weights -= lr * scaler.gradient(x, grad)
        clf.biases -= lr * grad.sum(axis=0)
        if evaluates(step, config):
            folded = scaler.fold(clf, np.float32)
            val = None
            if len(val_hot):
                at = next_val()
                val = (folded.logits(val_x(at)), val_hot[at])
            evaluation = _evaluation(step, folded.logits(x), y, val, config.log_steps)
            if on_eval is not None:
                on_eval(evaluation)
    return scaler.fold(clf)


def _evaluation(
    step: int, logits: np.ndarray, hot: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None, logs: bool
) -> Evaluation:
    """One evaluation point, with retrain.py's lines: exact-match ratios and the mean cross-entropy."""
    accuracy = exact_match(logits > 0, hot > 0.5) or 0.0
    cross_entropy = binary_cross_entropy(logits, hot)
    if logs:
        now = datetime.now()
        train_log.info("%s: Step %d: Train accuracy = %.1f%%", now, step, accuracy * 100)
        train_log.info("%s: Step %d: Cross entropy = %f", now, step, cross_entropy)
    if val is None:
        return Evaluation(step, accuracy, cross_entropy, None, None, 0)
    val_acc = exact_match(val[0] > 0, val[1]) or 0.0
    if logs:
        train_log.info(
            "%s: Step %d: Validation accuracy = %.1f%% (N=%d)",
            datetime.now(),
            step,
            val_acc * 100,
            len(val[1]),
        )
    return Evaluation(step, accuracy, cross_entropy, val_acc, binary_cross_entropy(*val), len(val[1]))


def probabilities(bottlenecks: Bottlenecks, positions: np.ndarray, clf: Classifier) -> np.ndarray:
    """``float32 [n, L]`` per-label probabilities of the images at ``positions`` (their first rows)."""
    ids = bottlenecks.first_rows(positions)
    out = np.zeros((len(ids), len(clf.biases)), np.float32)
    chunk = max(1, LOGITS_BYTES // (4 * len(clf.biases)))
    for start in range(0, len(ids), chunk):
        at = ids[start : start + chunk]
        out[start : start + chunk] = sigmoid(
            class_logits(bottlenecks, at, [clf], np.zeros(len(at), np.int64))
        )
    return out


def choose_thresholds(probs: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """``float32 [L]``: per label, halfway between the lowest score answered at the best F1 on
    ``probs``/``hot`` ``[N, L]`` and the next lower score (at least :data:`THRESHOLD_FLOOR`), or
    :data:`DEFAULT_THRESHOLD` with fewer than :data:`MIN_POSITIVES` positives."""
    out = np.full(hot.shape[1], DEFAULT_THRESHOLD, np.float32)
    for j in range(hot.shape[1]):
        positives = int(hot[:, j].sum())
        if positives < MIN_POSITIVES:
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        tp = np.cumsum(hot[order, j])
        f1 = 2 * tp / (np.arange(1, len(order) + 1) + positives)
        best = int(np.argmax(f1))
        below = probs[order[best + 1], j] if best + 1 < len(order) else probs[order[best], j]
        out[j] = max(float(probs[order[best], j] + below) / 2, THRESHOLD_FLOOR)
    return out


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean of the precision at each positive's rank (``scores`` ``[N]`` high first, ``truth`` bool
    ``[N]``); ``None`` without positives."""
    if not truth.any():
        return None
    hits = truth[np.argsort(-scores, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def score(
    probs: np.ndarray, hot: np.ndarray, thresholds: np.ndarray, labels: tuple[str, ...]
) -> MultiLabelScores:
    """The multi-label scores of ``probs`` ``[N, L]`` against ``hot`` ``bool [N, L]``."""
    predicted = probs >= thresholds
    tp = (predicted & hot).sum(axis=0)
    fp = (predicted & ~hot).sum(axis=0)
    fn = (~predicted & hot).sum(axis=0)
    per_label = {
        label: LabelScores(
            _ratio(tp[j], tp[j] + fp[j]),
            _ratio(tp[j], tp[j] + fn[j]),
            _ratio(2 * tp[j], 2 * tp[j] + fp[j] + fn[j]),
            average_precision(probs[:, j], hot[:, j]),
            int(hot[:, j].sum()),
            round(float(thresholds[j]), 6),
        )
        for j, label in enumerate(labels)
    }
    aps = [s.average_precision for s in per_label.values() if s.average_precision is not None]
    f1s = [s.f1 for s in per_label.values() if s.f1 is not None]
    return MultiLabelScores(
        float(np.mean(aps)) if aps else None,
        _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()),
        float(np.mean(f1s)) if f1s else None,
        exact_match(predicted, hot),
        len(hot),
        per_label,
    )


def fit_and_score(
    data: TrainingData,
    images: ImageSet,
    training: TrainingConfig,
    seed: int,
    on_evaluation: Callable[[Evaluation], None] | None,
) -> MultiLabel:
    """Train the sigmoids, choose the thresholds on the validation split, score the test split and log
    retrain.py's final lines ("Final test accuracy" is the exact-match ratio).

    The summary's :class:`Scores` hold exact-match ratios as accuracies; its confusion matrix compares
    each test image's highest-scoring label with its first label.

    Raises:
        DataError: training diverged.
    """
    hot = images.hot()
    fit = final_fit(data, training, seed)
    with np.errstate(over="ignore", invalid="ignore"):
        clf = train_sigmoid(data, fit, hot, on_evaluation)
    if not (np.isfinite(clf.weights).all() and np.isfinite(clf.biases).all()):
        raise DataError(
            f"training diverged (the last layer's weights are not numbers) with --learning_rate="
            f"{training.learning_rate:g}: lower --learning_rate; no model was written"
        )
    b = data.bottlenecks
    thresholds = choose_thresholds(probabilities(b, data.index[VALIDATION], clf), hot[data.index[VALIDATION]])
    probs = {s: probabilities(b, data.index[s], clf) for s in (TRAINING, VALIDATION, TESTING)}
    multi = score(probs[TESTING], hot[data.index[TESTING]], thresholds, images.labels)
    _log(multi)
    return MultiLabel(clf, thresholds, _scores(probs, hot, thresholds, data, multi), multi)


def _log(multi: MultiLabelScores) -> None:
    if multi.exact_match is None:
        log.warning("The test set is empty: no final test accuracy (raise --testing_percentage)")
        return
    log.info("Final test accuracy = %.1f%% (N=%d)", multi.exact_match * 100, multi.test_n)
    log.info(
        "Mean average precision = %.1f%%, micro-F1 = %.1f%%, macro-F1 = %.1f%% (N=%d)",
        100 * (multi.mean_average_precision or 0.0),
        100 * (multi.micro_f1 or 0.0),
        100 * (multi.macro_f1 or 0.0),
        multi.test_n,
    )


def _scores(
    probs: dict[str, np.ndarray],
    hot: np.ndarray,
    thresholds: np.ndarray,
    data: TrainingData,
    multi: MultiLabelScores,
) -> Scores:
    """The run summary's :class:`Scores` of a multi-label run (see :func:`fit_and_score`)."""
    exact = {s: exact_match(p >= thresholds, hot[data.index[s]]) for s, p in probs.items()}
    held = np.concatenate([probs[VALIDATION], probs[TESTING]])
    held_hot = np.concatenate([hot[data.index[VALIDATION]], hot[data.index[TESTING]]])
    test, first = probs[TESTING], data.labels[TESTING]
    top = test.argmax(axis=1) if len(test) else np.zeros(0, np.int64)
    rows = np.arange(len(test))
    predictions = Predictions(top, test[rows, top], test[rows, first])
    return Scores(
        multi.exact_match,
        multi.test_n,
        {**exact, "held_out": exact_match(held >= thresholds, held_hot)},
        len(held_hot),
        confusion_matrix(first, top, hot.shape[1]),
        None,
        multi.macro_f1,
        None,
        None,
        predictions,
    )
