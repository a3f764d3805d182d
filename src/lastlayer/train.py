"""The last layer: a softmax classifier trained in numpy with retrain.py's semantics.

Each step draws ``train_batch_size`` training images with replacement, a class uniformly at random
and then an image of that class (retrain.py's sampling), takes one of its cached distorted variants
when distortions are on, and makes one gradient-descent step on the mean cross-entropy. Every
``eval_step_interval`` steps and at the last step it reports the train accuracy and cross-entropy of
that batch and the accuracy on a validation batch drawn the same way (``-1``: the whole set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """retrain.py's training knobs (see :class:`lastlayer.options.RetrainOptions` for their docs)."""

    steps: int = 4000
    learning_rate: float = 0.01
    train_batch_size: int = 100
    eval_step_interval: int = 10
    validation_batch_size: int = 100
    seed: int = 0


@dataclass
class Classifier:
    """``probabilities = softmax(features @ weights + biases)``.

    Attributes:
        weights: ``float32 [D, C]``.
        biases: ``float32 [C]``.
    """

    weights: np.ndarray
    biases: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``float32 [N, C]`` logits of ``x`` ``[N, D]``."""
        return x @ self.weights + self.biases

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``int64 [N]`` most probable class of each row of ``x``."""
        return np.argmax(self.logits(x), axis=1)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation point of training."""

    step: int
    train_accuracy: float
    cross_entropy: float
    validation_accuracy: float | None
    validation_cross_entropy: float | None
    validation_n: int


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Probabilities ``[N, C]`` and mean cross-entropy (nats) of integer ``labels`` ``[N]``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    probs = exp / total
    log_likelihood = shifted[np.arange(len(labels)), labels] - np.log(total[:, 0])
    return probs, float(-log_likelihood.mean())


def _truncated_normal(rng: np.random.Generator, std: float, shape: tuple[int, int]) -> np.ndarray:
    """Normal values with draws beyond two standard deviations drawn again (TF's truncated_normal)."""
    out = rng.normal(0.0, std, shape)
    while (bad := np.abs(out) > 2 * std).any():
        out[bad] = rng.normal(0.0, std, int(bad.sum()))
    return out.astype(np.float32)


class _BalancedSampler:
    """Draws positions with replacement: a class uniformly, then an image of that class."""

    def __init__(self, labels: np.ndarray, n_classes: int) -> None:
        present = [c for c in range(n_classes) if np.any(labels == c)]
        self.order = np.concatenate([np.flatnonzero(labels == c) for c in present]) if present else labels
        self.counts = np.array([np.count_nonzero(labels == c) for c in present], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``int64 [n]`` positions."""
        classes = rng.integers(0, len(self.counts), n)
        within = (rng.random(n) * self.counts[classes]).astype(np.int64)
        return self.order[self.starts[classes] + within]


def train(
    train_x: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    dim: int,
    n_classes: int,
    config: TrainConfig,
    on_eval: Callable[[Evaluation], None] | None = None,
    on_checkpoint: Callable[[int, Classifier], None] | None = None,
) -> Classifier:
    """Train the softmax layer.

    Args:
        train_x: given positions ``[B]`` into the training set and the run's generator, the
            features ``float32 [B, D]`` to train on (one distorted variant each, when distortions are on).
        train_y: ``int64 [N_train]`` labels of the training set.
        val_x: ``float32 [N_val, D]`` validation features; ``val_y`` their labels.
        dim: feature size D; n_classes: C.
        on_eval: called at every evaluation point.
        on_checkpoint: called with ``(step, classifier)`` after every step (for intermediate graphs).
    """
    rng = np.random.default_rng(config.seed)
    clf = Classifier(_truncated_normal(rng, 0.001, (dim, n_classes)), np.zeros(n_classes, np.float32))
    sample_train = _BalancedSampler(train_y, n_classes)
    sample_val = _BalancedSampler(val_y, n_classes)
    lr = np.float32(config.learning_rate)
    for step in range(config.steps):
        if config.train_batch_size == -1:
            positions = np.arange(len(train_y))
        else:
            positions = sample_train(config.train_batch_size, rng)
        x = train_x(positions, rng)
        y = train_y[positions]
        probs, _ = softmax_cross_entropy(clf.logits(x), y)
        grad = probs
        grad[np.arange(len(y)), y] -= 1.0
        grad /= len(y)
        clf.weights -= lr * (x.T @ grad)
        clf.biases -= lr * grad.sum(axis=0)
        if step % config.eval_step_interval == 0 or step + 1 == config.steps:
            logits = clf.logits(x)  # retrain.py evaluates the batch again after the step
            _, cross_entropy = softmax_cross_entropy(logits, y)
            accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
            now = datetime.now()
            log.info("%s: Step %d: Train accuracy = %.1f%%", now, step, accuracy * 100)
            log.info("%s: Step %d: Cross entropy = %f", now, step, cross_entropy)
            val_acc = val_ce = None
            val_n = 0
            if len(val_y):
                if config.validation_batch_size == -1:
                    vpos = np.arange(len(val_y))
                else:
                    vpos = sample_val(config.validation_batch_size, rng)
                vlogits = clf.logits(val_x[vpos])
                _, val_ce = softmax_cross_entropy(vlogits, val_y[vpos])
                val_acc = float(np.mean(np.argmax(vlogits, axis=1) == val_y[vpos]))
                val_n = len(vpos)
                log.info(
                    "%s: Step %d: Validation accuracy = %.1f%% (N=%d)",
                    datetime.now(),
                    step,
                    val_acc * 100,
                    val_n,
                )
            if on_eval is not None:
                on_eval(Evaluation(step, accuracy, cross_entropy, val_acc, val_ce, val_n))
        if on_checkpoint is not None:
            on_checkpoint(step, clf)
    return clf
