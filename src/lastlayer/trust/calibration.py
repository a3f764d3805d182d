"""Temperature scaling (Guo et al., 2017): one scalar ``T`` that divides the logits, fitted by
maximum likelihood on held-out predictions, and the expected calibration error (ECE).

Dividing the last layer's weights and biases by ``T`` gives the calibrated model with no extra op;
the predicted class never changes. Written here in numpy (lastlayer does not depend on scipy): the
negative log-likelihood is convex in ``beta = 1 / T``, so its minimum is where its derivative, which
grows with ``beta``, crosses zero, found by bisection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Bins of the expected calibration error and of the reliability diagram (equal widths on [0, 1]).
ECE_BINS = 15
#: The temperature is kept in [1 / BETA_MAX, 1 / BETA_MIN] (a held-out set the model gets all right
#: would push it towards 0: no finite optimum).
BETA_MIN, BETA_MAX = 0.01, 100.0
_BISECTIONS = 60


def softmax(logits: np.ndarray) -> np.ndarray:
    """``float64 [N, C]`` probabilities of ``logits`` ``[N, C]``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _slope(beta: float, logits: np.ndarray, labels: np.ndarray) -> float:
    """d NLL / d beta of ``softmax(beta * logits)``: the mean of ``E_p[z] - z_label``."""
    probs = softmax(beta * logits)
    return float(np.mean((probs * logits).sum(axis=1) - logits[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` that minimizes the cross-entropy of ``softmax(logits / T)`` on
    ``labels`` ``int64 [N]``; 1.0 when ``logits`` ``[N, C]`` is empty."""
    if not len(labels):
        return 1.0
    z = logits.astype(np.float64)
    lo, hi = np.log(BETA_MIN), np.log(BETA_MAX)
    if _slope(BETA_MIN, z, labels) >= 0:
        return 1.0 / BETA_MIN
    if _slope(BETA_MAX, z, labels) <= 0:
        return 1.0 / BETA_MAX
    for _ in range(_BISECTIONS):  # in log(beta): the same roots, even steps over 4 decades
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _slope(float(np.exp(mid)), z, labels) < 0 else (lo, mid)
    return float(np.exp(-(lo + hi) / 2))


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's bins (equal widths on [0, 1]; empty bins included).

    Attributes:
        confidence: mean top probability of the predictions in each bin (``None`` when empty).
        accuracy: their share of correct answers (``None`` when empty).
        count: predictions per bin.
    """

    confidence: list[float | None]
    accuracy: list[float | None]
    count: list[int]


def _bins(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin of top probability: predictions, sum of top probabilities, correct answers."""
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = probs.argmax(axis=1) == labels if len(probs) else np.zeros(0, bool)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    return count, np.bincount(which, confidence, bins), np.bincount(which, correct.astype(np.float64), bins)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """The bins of the predictions ``probs`` ``[N, C]`` of classes ``labels`` ``int64 [N]``, by top
    probability."""
    count, confidence, right = _bins(probs, labels, bins)

    def mean(total: np.ndarray) -> list[float | None]:
        return [round(float(t / n), 6) if n else None for t, n in zip(total, count, strict=True)]

    return Reliability(mean(confidence), mean(right), count.tolist())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: the mean over bins of ``|accuracy - confidence|`` weighted by the
    bin's share of the predictions ``probs`` ``[N, C]``; ``None`` without predictions."""
    if not len(labels):
        return None
    _, confidence, right = _bins(probs, labels, bins)
    return round(float(np.abs(right - confidence).sum() / len(labels)), 6)
