"""The last layer: a softmax classifier trained in numpy, with retrain.py's steps, flags and log lines.

Each step draws ``train_batch_size`` training images with replacement (uniformly over the images,
or a class uniformly and then an image of it, retrain.py's way, with ``balance_classes``), takes one
of its cached distorted variants when distortions are on, and makes one gradient-descent step on the
mean cross-entropy. Features are standardized with the training split's mean and standard deviation
(:class:`Standardizer`); the returned :class:`Classifier` has them folded into its weights, so it
applies to raw features and the exported model needs no extra op. Every ``eval_step_interval``
steps and at the last step it reports the train accuracy and cross-entropy of that batch and the
accuracy on a validation batch drawn the same way (``-1``: the whole set).

The training positions and the validation batches come from seeded streams of their own, so that
:func:`draw_counts` and :func:`validation_draws` can replay them before training: the rows training
will read are known in advance and gathered from the cache in one pass (:mod:`lastlayer.bottlenecks.passes`).

Measured (docs/benchmarks.md, "Model quality"): standardizing makes 500 steps at retrain.py's
learning rate converge on thousands of images (+2 to +3.7 points by cross-validation where plain
features under-fit), and drawing images uniformly instead of class-uniformly keeps an imbalanced set
from being scored below its largest class's share. Weight decay chosen on validation data, label
smoothing, dropout on features, momentum, and a full-batch L-BFGS fit changed accuracy by less than
the folds' spread and were left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

#: The logger name its lines always had (``lastlayer.train``), whatever the module's name.
log = logging.getLogger("lastlayer.train")

#: Second word of the seed of the training-position stream (kept apart from the other draws, so
#: that :func:`draw_counts` can replay it before the features exist).
POSITION_STREAM = 1
#: Second word of the seed of the validation batches' stream (replayed by :func:`validation_draws`).
VALIDATION_STREAM = 2
#: Draws :func:`draw_counts` counts at once (32 MiB of int64).
_COUNTED_AT_ONCE = 1 << 22
#: A feature whose standard deviation on the training split is below this is only centred.
MIN_STD = 1e-6


@dataclass(frozen=True)
class TrainConfig:
    """retrain.py's training knobs (see :class:`lastlayer.settings.run.TrainingConfig` for their docs).

    Attributes:
        log_steps: whether to log the evaluation points (off for cross-validation folds).
    """

    steps: int = 4000
    learning_rate: float = 0.01
    train_batch_size: int = 100
    eval_step_interval: int = 10
    validation_batch_size: int = 100
    seed: int = 0
    balance_classes: bool = False
    log_steps: bool = True


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
class Standardizer:
    """``(x - mean) * scale`` per feature: zero mean and unit variance on the training split.

    Attributes:
        mean: ``float32 [D]``.
        scale: ``float32 [D]``: 1 / standard deviation (1 where that is below :data:`MIN_STD`).
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Standardizer:
        """The statistics of ``x`` ``[N, D]`` (accumulated in float64, without a float64 copy)."""
        return cls.from_statistics(x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64))

    @classmethod
    def from_statistics(cls, mean: np.ndarray, std: np.ndarray) -> Standardizer:
        """The standardizer of features with this ``mean`` and (population) ``std``, ``[D]`` each."""
        scale = np.where(std < MIN_STD, 1.0, 1.0 / np.maximum(std, MIN_STD))
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``float32 [N, D]`` standardized ``x``."""
        return (x - self.mean) * self.scale

    def fold(self, clf: Classifier, dtype: type = np.float64) -> Classifier:
        """The classifier on raw features equal to ``clf`` on standardized ones:
        ``W' = scale * W``, ``b' = b - (mean * scale) @ W``, computed in ``dtype``."""
        w = clf.weights.astype(dtype)
        scale, mean = self.scale.astype(dtype), self.mean.astype(dtype)
        weights = scale[:, None] * w
        biases = clf.biases.astype(dtype) - (mean * scale) @ w
        return Classifier(weights.astype(np.float32), biases.astype(np.float32))

    def gradient(self, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """``standardized(x).T @ grad`` ``[D, C]`` from raw ``x`` ``[B, D]`` and ``grad`` ``[B, C]``,
        without standardizing the batch (a D x C correction instead of a B x D pass)."""
        return self.scale[:, None] * (x.T @ grad - np.outer(self.mean, grad.sum(axis=0)))


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


def truncated_normal(rng: np.random.Generator, std: float, shape: tuple[int, int]) -> np.ndarray:
    """Normal values with draws beyond two standard deviations drawn again (TF's truncated_normal)."""
    out = rng.normal(0.0, std, shape)
    while (bad := np.abs(out) > 2 * std).any():
        out[bad] = rng.normal(0.0, std, int(bad.sum()))
    return out.astype(np.float32)


class Sampler:
    """Draws ``n`` positions with replacement: uniformly over the images, or (``balanced``) a class
    uniformly and then an image of that class; ``n = -1`` gives every position once."""

    def __init__(self, labels: np.ndarray, n_classes: int, balanced: bool) -> None:
        per_class = np.bincount(labels, minlength=n_classes).astype(np.int64)
        self.size = len(labels)
        self.balanced = balanced
        self.order = np.argsort(labels, kind="stable")  # each present class's positions, in turn
        self.counts = per_class[per_class > 0]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``int64 [n]`` positions."""
        if n == -1:
            return np.arange(self.size)
        if not self.balanced:
            return rng.integers(0, self.size, n)
        classes = rng.integers(0, len(self.counts), n)
        within = (rng.random(n) * self.counts[classes]).astype(np.int64)
        return self.order[self.starts[classes] + within]


def batch_positions(train_y: np.ndarray, n_classes: int, config: TrainConfig) -> Callable[[], np.ndarray]:
    """The training batches' positions, one call per step, from their own seeded stream."""
    sampler = Sampler(train_y, n_classes, config.balance_classes)
    rng = np.random.default_rng([config.seed, POSITION_STREAM])
    return lambda: sampler(config.train_batch_size, rng)


def validation_positions(val_y: np.ndarray, n_classes: int, config: TrainConfig) -> Callable[[], np.ndarray]:
    """The validation batches' positions, one call per evaluation point, from their own seeded
    stream."""
    sampler = Sampler(val_y, n_classes, config.balance_classes)
    rng = np.random.default_rng([config.seed, VALIDATION_STREAM])
    return lambda: sampler(config.validation_batch_size, rng)


def evaluates(step: int, config: TrainConfig) -> bool:
    """Whether training evaluates at ``step`` (every ``eval_step_interval`` steps and the last)."""
    return step % config.eval_step_interval == 0 or step + 1 == config.steps


def validation_draws(val_y: np.ndarray, n_classes: int, config: TrainConfig) -> np.ndarray:
    """``int64``: the validation positions :func:`train` with ``config`` will score, every
    evaluation point's batch one after the other (replayed without training)."""
    if not len(val_y):
        return np.zeros(0, np.int64)
    next_batch = validation_positions(val_y, n_classes, config)
    batches = [next_batch() for s in range(config.steps) if evaluates(s, config)]
    return np.concatenate(batches) if batches else np.zeros(0, np.int64)


def draw_counts(train_y: np.ndarray, n_classes: int, config: TrainConfig) -> np.ndarray:
    """``int64 [N_train]``: how often :func:`train` with ``config`` will draw each training image
    (replayed without training, so that only the distorted variants it draws need computing)."""
    next_batch = batch_positions(train_y, n_classes, config)
    counts = np.zeros(len(train_y), np.int64)
    drawn: list[np.ndarray] = []
    pending = 0
    for step in range(config.steps):  # counted a chunk of draws at a time: steps x N would not scale
        drawn.append(next_batch())
        pending += len(drawn[-1])
        if pending >= _COUNTED_AT_ONCE or step + 1 == config.steps:
            counts += np.bincount(np.concatenate(drawn), minlength=len(train_y))
            drawn, pending = [], 0
    return counts


def train(
    train_x: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    train_y: np.ndarray,
    val_x: Callable[[np.ndarray], np.ndarray],
    val_y: np.ndarray,
    dim: int,
    n_classes: int,
    config: TrainConfig,
    on_eval: Callable[[Evaluation], None] | None = None,
    on_checkpoint: Callable[[int, Classifier], None] | None = None,
    standardizer: Standardizer | None = None,
) -> Classifier:
    """Train the softmax layer.

    Args:
        train_x: given positions ``[B]`` into the training set and the run's generator, the
            features ``float32 [B, D]`` to train on (one distorted variant each, when distortions are on).
        train_y: ``int64 [N_train]`` labels of the training set.
        val_x: given validation positions ``[V]``, their features ``float32 [V, D]``; ``val_y``
            ``int64 [N_val]`` the validation set's labels.
        dim: feature size D; n_classes: C.
        on_eval: called at every evaluation point.
        on_checkpoint: called with ``(step, classifier)`` after every step (for intermediate graphs).
        standardizer: the training split's statistics (default: none, raw features).

    Returns:
        The classifier on raw features (the standardization folded in).

    The weights live in standardized space (``clf``); each step runs on raw features with them folded
    in (:meth:`Standardizer.fold`, a D x C product), so standardizing costs no pass over the batch.
    """
    rng = np.random.default_rng(config.seed)
    scaler = standardizer or Standardizer(np.zeros(dim, np.float32), np.ones(dim, np.float32))
    clf = Classifier(truncated_normal(rng, 0.001, (dim, n_classes)), np.zeros(n_classes, np.float32))
    next_batch = batch_positions(train_y, n_classes, config)
    validation = _Validation(val_x, val_y, n_classes, config)
    lr = np.float32(config.learning_rate)
    for step in range(config.steps):
        positions = next_batch()
        x = train_x(positions, rng)
        y = train_y[positions]
        probs, _ = softmax_cross_entropy(scaler.fold(clf, np.float32).logits(x), y)
        grad = probs
        grad[np.arange(len(y)), y] -= 1.0
        grad /= len(y)
        clf.weights -= lr * scaler.gradient(x, grad)
        clf.biases -= lr * grad.sum(axis=0)
        if evaluates(step, config):
            folded = scaler.fold(clf, np.float32)
            evaluation = _evaluate(folded, x, y, validation, step, config)
            if on_eval is not None:
                on_eval(evaluation)
        if on_checkpoint is not None:
            on_checkpoint(step, scaler.fold(clf))
    return scaler.fold(clf)


class _Validation:
    """The validation batches of :func:`train`: drawn from their own stream, as :func:`validation_draws`
    replays them."""

    def __init__(
        self,
        features: Callable[[np.ndarray], np.ndarray],
        labels: np.ndarray,
        n_classes: int,
        config: TrainConfig,
    ) -> None:
        self.features, self.labels = features, labels
        self.next_positions = validation_positions(labels, n_classes, config)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch's features ``[V, D]`` and labels ``[V]``."""
        positions = self.next_positions()
        return self.features(positions), self.labels[positions]


def _evaluate(
    clf: Classifier,
    x: np.ndarray,
    y: np.ndarray,
    validation: _Validation,
    step: int,
    config: TrainConfig,
) -> Evaluation:
    """One evaluation point: the step's batch again after the step (as retrain.py does) and a
    validation batch; logged with retrain.py's lines unless ``config.log_steps`` is off."""
    logits = clf.logits(x)
    _, cross_entropy = softmax_cross_entropy(logits, y)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
    if config.log_steps:
        now = datetime.now()
        log.info("%s: Step %d: Train accuracy = %.1f%%", now, step, accuracy * 100)
        log.info("%s: Step %d: Cross entropy = %f", now, step, cross_entropy)
    val_acc = val_ce = None
    val_n = 0
    if len(validation.labels):
        val_x, val_y = validation.batch()
        vlogits = clf.logits(val_x)
        _, val_ce = softmax_cross_entropy(vlogits, val_y)
        val_acc = float(np.mean(np.argmax(vlogits, axis=1) == val_y))
        val_n = len(val_y)
        if config.log_steps:
            log.info(
                "%s: Step %d: Validation accuracy = %.1f%% (N=%d)", datetime.now(), step, val_acc * 100, val_n
            )
    return Evaluation(step, accuracy, cross_entropy, val_acc, val_ce, val_n)
