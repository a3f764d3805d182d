"""The numpy softmax layer: learns, is reproducible, logs retrain.py's lines."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from lastlayer.training.evaluate import confusion_matrix, per_class_scores
from lastlayer.training.train import TrainConfig, softmax_cross_entropy, train


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    centres = np.eye(3, 8, dtype=np.float32) * 4
    return (centres[y] + rng.normal(0, 1, (n, 8))).astype(np.float32), y


def run(seed: int, steps: int = 200, **kw):
    rng = np.random.default_rng(1)
    x, y = blobs(300, rng)
    vx, vy = blobs(60, rng)
    evals = []
    clf = train(
        lambda pos, _rng: x[pos],
        y,
        lambda pos: vx[pos],
        vy,
        8,
        3,
        TrainConfig(steps=steps, learning_rate=0.1, seed=seed, **kw),
        on_eval=evals.append,
    )
    return clf, evals, vx, vy


def test_learns_separable_blobs():
    clf, evals, vx, vy = run(0)
    assert np.mean(clf.predict(vx) == vy) > 0.95
    assert evals[-1].step == 199 and evals[0].step == 0
    assert [e.step for e in evals[:3]] == [0, 10, 20]


def test_seed_makes_it_reproducible():
    a, *_ = run(5)
    b, *_ = run(5)
    c, *_ = run(6)
    assert np.array_equal(a.weights, b.weights) and not np.array_equal(a.weights, c.weights)


def test_log_lines_are_retrain_py_verbatim(caplog):
    with caplog.at_level(logging.INFO):
        run(0, steps=11, eval_step_interval=10, validation_batch_size=-1)
    text = caplog.text
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: Step 10: Train accuracy = \d+\.\d%", text)
    assert re.search(r": Step 10: Cross entropy = \d+\.\d{6}\n", text)
    assert re.search(r": Step 10: Validation accuracy = \d+\.\d% \(N=60\)", text)


def test_cross_entropy_matches_definition():
    logits = np.array([[2.0, 0.0], [0.0, 3.0]])
    probs, ce = softmax_cross_entropy(logits, np.array([0, 0]))
    expected = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(1 / (1 + np.exp(3)))])
    assert ce == pytest.approx(expected)
    assert np.allclose(probs.sum(axis=1), 1)


def test_confusion_and_scores():
    cm = confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    precision, recall = per_class_scores(cm)
    assert precision[1] == pytest.approx(2 / 3) and recall[0] == 0.5 and np.isnan(precision[2])
