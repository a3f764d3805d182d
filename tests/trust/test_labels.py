"""Suspected wrong labels (lastlayer.trust.labels): the confident joint's count, the order, the
out-of-fold probabilities, and a run that lists a photo put in the wrong folder."""

from __future__ import annotations

import shutil

import numpy as np

from helpers import retrain_summary
from lastlayer.trust import labels


def test_the_confident_joint_counts_labels_another_class_confidently_claims():
    probs = np.array(
        [
            [0.9, 0.1],  # class 0, sure
            [0.7, 0.3],  # class 0
            [0.2, 0.8],  # labelled 0, class 1 is above its threshold (0.85 / 2... see below)
            [0.1, 0.9],  # class 1, sure
            [0.2, 0.8],  # class 1
            [0.6, 0.4],  # labelled 1: class 0 reaches its threshold 0.6 and beats 0.4
        ]
    )
    given = np.array([0, 0, 0, 1, 1, 1])
    # thresholds: class 0 = mean(0.9, 0.7, 0.2) = 0.6, class 1 = mean(0.9, 0.8, 0.4) = 0.7
    assert labels.confident_joint_count(probs, given) == 2
    assert labels.suspects(probs, given).tolist() == [2, 5]  # given-label probability 0.2, then 0.4


def test_out_of_fold_probabilities_find_flipped_labels_of_separable_classes():
    rng = np.random.default_rng(0)
    truth = np.arange(300) % 3
    x = (rng.normal(0, 1, (300, 40)) + 5 * np.eye(3, 40)[truth]).astype(np.float32)
    given = truth.copy()
    flipped = rng.choice(300, 15, replace=False)
    given[flipped] = (truth[flipped] + 1) % 3
    probs = labels.out_of_fold(x, given, 3, 5, seed=1)
    assert probs.shape == (300, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.mean(probs.argmax(axis=1) == truth) > 0.95  # no fold saw its own labels
    listed = labels.suspects(probs, given)
    found = np.isin(listed, flipped).sum()
    assert found / len(listed) >= 0.9 and found / len(flipped) >= 0.7  # the count errs on the low side


def test_a_run_lists_a_photo_in_the_wrong_folder_and_a_flag_turns_it_off(tmp_path, shapes_dir, model_dir):
    images = tmp_path / "images"
    shutil.copytree(shapes_dir, images)
    (images / "Red Circles" / "img_007.jpg").rename(images / "blue_squares" / "moved.jpg")

    def run(name: str, **training) -> dict:
        return retrain_summary(images, tmp_path, model_dir, name, 20, **training)

    issues = run("on")["trust"]["label_issues"]
    assert issues["folds"] == 5 and issues["images"] == 90
    first = issues["listed"][0]
    assert first["path"] == "blue_squares/moved.jpg" and first["suggested_label"] == "red circles"
    assert first["given_label"] == "blue squares" and first["given_score"] < 0.5 < first["suggested_score"]
    assert (tmp_path / "on" / "g.report.html").read_text().count("blue_squares/moved.jpg") >= 1
    assert run("off", find_label_issues=False)["trust"]["label_issues"] is None
