"""Calibration (lastlayer.trust.calibration): the temperature's fit, the expected calibration error,
and a run that folds the temperature into the exported model."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import retrain_summary
from lastlayer.model.inference import RetrainedModel
from lastlayer.trust import calibration


def _sampled(temperature: float, n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from ``softmax(logits / temperature)``: that temperature fits them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 4))
    probs = calibration.softmax(logits / temperature)
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(temperature):
    logits, labels = _sampled(temperature)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.05)


def test_the_temperature_stays_in_its_bounds_when_every_answer_is_right():
    logits = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert calibration.fit_temperature(logits, np.array([0, 1])) == 1 / calibration.BETA_MAX
    assert calibration.fit_temperature(np.zeros((0, 2)), np.zeros(0, np.int64)) == 1.0


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    # two predictions at 0.9 (one right) and two at 0.6 (both right): |0.5 - 0.9| / 2 + |1 - 0.6| / 2
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    assert calibration.ece(probs, labels) == pytest.approx(0.4)
    bins = calibration.reliability(probs, labels)
    assert sum(bins.count) == 4 and bins.accuracy[13] == 0.5 and bins.confidence[9] == pytest.approx(0.6)
    assert calibration.ece(probs[:0], labels[:0]) is None


def test_scaling_by_the_fitted_temperature_lowers_the_ece_of_overconfident_logits():
    logits, labels = _sampled(3.0)
    t = calibration.fit_temperature(logits, labels)
    before = calibration.ece(calibration.softmax(logits), labels)
    after = calibration.ece(calibration.softmax(logits / t), labels)
    assert before > 0.1 and after < 0.02


def test_a_run_exports_the_calibrated_model_and_reports_the_ece(tmp_path, shapes_dir, model_dir):
    def run(name: str, calibrate: bool) -> tuple[dict, RetrainedModel]:
        summary = retrain_summary(shapes_dir, tmp_path, model_dir, name, 40, calibrate=calibrate)
        return summary, RetrainedModel.load(str(tmp_path / name / "g.onnx"))

    plain_summary, plain = run("plain", False)
    summary, calibrated = run("calibrated", True)
    assert plain_summary["trust"]["calibration"] is None
    fitted = summary["trust"]["calibration"]
    assert fitted["fitted_on"] == "validation" and fitted["fitted_n"] == summary["images"]["validation"]
    assert fitted["test_ece_before"] is not None and fitted["temperature"] != 1.0
    image = (shapes_dir / "blue_squares" / "img_000.jpg").read_bytes()
    inputs = [plain.prepare(image)]
    expected = calibration.softmax(np.log(plain.probabilities(inputs)) / fitted["temperature"])
    np.testing.assert_allclose(calibrated.probabilities(inputs), expected, atol=1e-4)
