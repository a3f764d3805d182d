"""The memo of the trust stage's findings: a warm re-run with the same cache, flags and seed reads them
back (same model, same summary entry); any change of input computes them again."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import make_dataset, retrain_summary
from lastlayer.training.train import Classifier
from lastlayer.trust import memo, stage

REUSED = "Trust findings reused"


def _entries(tmp: Path, kind: str) -> list[Path]:
    return sorted((tmp / "b").glob(f"*/{memo.FOLDER}/{kind}-*"))  # in the network's cache folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "images", per_class=20)


def test_a_warm_re_run_reuses_the_findings_and_exports_the_same_model(images, tmp_path, model_dir, caplog):
    caplog.set_level(logging.INFO, "lastlayer.retrain")
    cold = retrain_summary(images, tmp_path, model_dir, "cold", 40)
    assert REUSED not in caplog.text
    assert len(_entries(tmp_path, stage.MEMO_KIND)) == 1
    caplog.clear()
    warm = retrain_summary(images, tmp_path, model_dir, "warm", 40)
    assert REUSED in caplog.text
    assert warm["trust"] == cold["trust"] and warm["trust"]["calibration"] is not None
    assert warm["trust"]["unknown"] is not None and warm["trust"]["label_issues"] is not None
    assert (tmp_path / "warm" / "g.onnx").read_bytes() == (tmp_path / "cold" / "g.onnx").read_bytes()


def test_a_changed_flag_or_cache_content_computes_the_findings_again(images, tmp_path, model_dir, caplog):
    caplog.set_level(logging.INFO, "lastlayer.retrain")
    first = retrain_summary(images, tmp_path, model_dir, "first", 40)
    caplog.clear()
    other = retrain_summary(images, tmp_path, model_dir, "flag", 40, unknown_recall=80.0)
    assert REUSED not in caplog.text
    assert other["trust"]["unknown"]["recall"] == 0.8 != first["trust"]["unknown"]["recall"]
    caplog.clear()
    victim = sorted((images / "blue_squares").iterdir())[0]
    shutil.copy(sorted((images / "Red Circles").iterdir())[0], victim)  # same name, other content
    retrain_summary(images, tmp_path, model_dir, "content", 40)
    assert REUSED not in caplog.text
    assert len(_entries(tmp_path, stage.MEMO_KIND)) == 3


def test_a_damaged_entry_is_computed_again_and_replaced(images, tmp_path, model_dir, caplog):
    caplog.set_level(logging.INFO, "lastlayer.retrain")
    cold = retrain_summary(images, tmp_path, model_dir, "cold", 40)
    (entry,) = _entries(tmp_path, stage.MEMO_KIND)
    entry.write_bytes(b"not an npz")
    caplog.clear()
    again = retrain_summary(images, tmp_path, model_dir, "again", 40)
    assert "damaged" in caplog.text and REUSED not in caplog.text
    assert again["trust"] == cold["trust"]
    caplog.clear()
    retrain_summary(images, tmp_path, model_dir, "warm", 40)
    assert REUSED in caplog.text


def _key_inputs() -> tuple[stage.Features, Classifier, stage.Settings, stage.Names]:
    rng = np.random.default_rng(0)
    features = stage.Features(
        np.arange(6), rng.normal(size=(6, 4)).astype(np.float32), np.array([0, 1] * 3), np.zeros(6, np.int64)
    )
    classifier = Classifier(rng.normal(size=(4, 2)).astype(np.float32), np.zeros(2, np.float32))
    names = stage.Names(lambda at: [f"img{i}.jpg" for i in at], ("a", "b"))
    return features, classifier, stage.Settings(), names


def test_the_key_covers_the_seed_features_classifier_paths_and_folds():
    features, classifier, settings, names = _key_inputs()
    base = stage.memo_key(features, classifier, settings, names, None)
    assert stage.memo_key(features, classifier, settings, names, None) == base
    x = features.x.copy()
    x[0, 0] += 1e-6
    oof = stage.OutOfFold(np.arange(6), features.labels, np.arange(6) % 2, [classifier, classifier])
    changed = [
        stage.memo_key(features, classifier, dataclasses.replace(settings, seed=1), names, None),
        stage.memo_key(dataclasses.replace(features, x=x), classifier, settings, names, None),
        stage.memo_key(
            features, Classifier(classifier.weights, classifier.biases + 1), settings, names, None
        ),
        stage.memo_key(
            features, classifier, settings, stage.Names(lambda at: ["x"] * len(at), ("a", "b")), None
        ),
        stage.memo_key(features, classifier, settings, names, oof),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_an_entry_with_a_flipped_byte_is_refused_by_its_checksums(images, tmp_path, model_dir, caplog):
    caplog.set_level(logging.INFO, "lastlayer.retrain")
    cold = retrain_summary(images, tmp_path, model_dir, "cold", 40)
    (entry,) = _entries(tmp_path, stage.MEMO_KIND)
    data = bytearray(entry.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside an array's bytes
    entry.write_bytes(bytes(data))
    caplog.clear()
    again = retrain_summary(images, tmp_path, model_dir, "again", 40)
    assert "damaged" in caplog.text and REUSED not in caplog.text
    assert again["trust"] == cold["trust"]
