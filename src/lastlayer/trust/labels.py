"""Suspected wrong labels: confident learning (Northcutt, Jiang and Chuang, 2021) on out-of-fold
probabilities of the cached features.

:func:`out_of_fold` refits a softmax layer K times (stratified folds; standardized features projected
on their leading principal directions, full-batch gradient descent: a fraction of a second on
thousands of images, no network pass) and gives every image the probabilities of the fit that did not
see it. :func:`confident_joint_count` is how many labels confident learning estimates to be wrong: an
image counts when another class's probability reaches that class's own average self-confidence
(its threshold ``t_j``) and beats the given class's probability too. :func:`suspects` lists that many
images, those whose given label has the lowest probability first. cleanlab implements the same
method but depends on scikit-learn and pandas, which lastlayer does not; and its default filter
(``prune_by_noise_rate``) listed 2.4 times as many images as were mislabelled on the flower sample
(issue 20), so the count here is the confident joint's off-diagonal sum and the order is by the
given label's probability.
"""

from __future__ import annotations

import numpy as np

from lastlayer.training.data import folds
from lastlayer.training.train import Standardizer
from lastlayer.trust.calibration import softmax

#: Principal directions of the standardized features the folds are fitted on.
COMPONENTS = 128
#: Gradient steps of each fold's fit, and the L2 penalty on its weights.
STEPS = 200
L2 = 0.001


def _basis(x: np.ndarray, components: int) -> np.ndarray:
    """``float32 [N, r]``: ``x`` standardized and projected on its ``r`` leading principal directions
    (a rotation that keeps the scale, computed without the labels, so no fold learns from another's
    labels); from the eigenvectors of the ``N x N`` Gram matrix when ``N < D``, else of the
    ``D x D`` covariance."""
    z = Standardizer.of(x)(x)
    z -= z.mean(axis=0)
    n, d = z.shape
    r = min(components, n, d)
    if n < d:
        values, vectors = np.linalg.eigh(z @ z.T)
        return (vectors[:, -r:] * np.sqrt(np.maximum(values[-r:], 0) / n)).astype(np.float32)
    _, vectors = np.linalg.eigh(z.T @ z)
    return (z @ vectors[:, -r:] / np.sqrt(n)).astype(np.float32)


def _fit(x: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``[r, C]`` and biases ``[C]`` of a softmax layer fitted to standardized ``x`` by
    :data:`STEPS` steps of full-batch gradient descent (step 1 / the loss's smoothness bound)."""
    z = x
    onehot = np.eye(n_classes, dtype=np.float32)[labels]
    rate = 1.0 / (0.5 * float(np.linalg.norm(z, 2)) ** 2 / len(z) + L2 + 0.5)
    w = np.zeros((x.shape[1], n_classes), np.float32)
    b = np.zeros(n_classes, np.float32)
    w_ahead, b_ahead = w, b
    for step in range(STEPS):  # Nesterov's accelerated gradient
        grad = (softmax(z @ w_ahead + b_ahead).astype(np.float32) - onehot) / len(z)
        w_next = w_ahead - rate * (z.T @ grad + L2 * w_ahead)
        b_next = b_ahead - rate * grad.sum(axis=0)
        momentum = step / (step + 3)
        w_ahead, b_ahead = w_next + momentum * (w_next - w), b_next + momentum * (b_next - b)
        w, b = w_next, b_next
    return w, b


def out_of_fold(x: np.ndarray, labels: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """``float32 [N, C]``: each image's class probabilities by a softmax fitted on the other folds
    of ``k`` (stratified, seeded) over the features ``x`` ``[N, D]`` of classes ``labels`` ``[N]``."""
    basis = _basis(x, COMPONENTS)
    fold_of = folds(labels, k, seed)
    probs = np.zeros((len(labels), n_classes), np.float32)
    for f in range(k):
        held = fold_of == f
        w, b = _fit(basis[~held], labels[~held], n_classes)
        probs[held] = softmax(basis[held] @ w + b)
    return probs


def confident_joint_count(probs: np.ndarray, labels: np.ndarray) -> int:
    """How many of the given ``labels`` ``[N]`` confident learning estimates to be wrong, from
    out-of-fold ``probs`` ``[N, C]``: the off-diagonal sum of the confident joint."""
    n_classes = probs.shape[1]
    given = np.bincount(labels, minlength=n_classes)
    thresholds = np.bincount(labels, probs[np.arange(len(labels)), labels], n_classes) / np.maximum(given, 1)
    thresholds = np.where(given > 0, thresholds, np.inf)
    confident = np.where(probs >= thresholds, probs, -1.0)
    best = confident.argmax(axis=1)
    counted = confident.max(axis=1) >= 0
    return int(np.sum(counted & (best != labels)))


def suspects(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``int64``: the images confident learning suspects (:func:`confident_joint_count` of them),
    the lowest probability of the given label first."""
    given = probs[np.arange(len(labels)), labels]
    order = np.argsort(given, kind="stable")
    return order[: confident_joint_count(probs, labels)]
