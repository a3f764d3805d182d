""" "None of the above" (lastlayer.trust.ood): the distance, its ONNX form, the threshold, AUROC,
and a run whose model says "unknown" through label."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from helpers import jpeg_bytes, retrain_summary
from lastlayer.cli import main
from lastlayer.model.inference import RetrainedModel, label
from lastlayer.trust import ood


def _classes(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = rng.normal(0, 1, (n, d)) * rng.uniform(0.2, 3, d) + 2 * np.eye(3, d)[labels] + 5
    return x.astype(np.float32), labels


@pytest.mark.parametrize(("n", "d"), [(60, 6), (24, 40)])
def test_the_distance_is_mahalanobis_under_the_shrunk_pooled_covariance(n, d):
    x, labels = _classes(n, d)
    distance = ood.fit(x, labels, 3, components=d)
    z = distance.standardizer(x).astype(np.float64)
    centred = z - distance.centres[labels]
    sample = centred.T @ centred / n
    mu = np.trace(sample) / d
    # the fitted shrinkage a and the kept variance (1 - rho) S: Sigma = (1 - rho) S + rho mu I
    rho = distance.shrinkage / mu
    precision = np.linalg.inv((1 - rho) * sample + rho * mu * np.eye(d))
    queries = np.random.default_rng(1).normal(0, 2, (7, d)).astype(np.float32) + 5
    zq = distance.standardizer(queries).astype(np.float64)
    expected = (
        np.min([np.einsum("nd,de,ne->n", zq - c, precision, zq - c) for c in distance.centres], axis=0) / d
    )
    np.testing.assert_allclose(distance(queries), expected, rtol=2e-3)
    assert 0 < rho < 1


def test_fewer_directions_keep_the_largest_variances():
    x, labels = _classes(200, 30)
    few = ood.fit(x, labels, 3, components=4)
    assert few.directions.shape == (30, 4)
    far = x[:5] + 40
    assert (few(far) > few(x[:5])).all()


def test_the_onnx_nodes_compute_the_same_distance():
    x, labels = _classes(50, 12)
    distance = ood.fit(x, labels, 3, components=5)
    nodes, tensors = ood.onnx_nodes(distance, "features", "score")
    graph = helper.make_graph(
        nodes,
        "ood",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 12])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    queries = np.concatenate([x[:4], x[:4] * 3])
    (got,) = ort.InferenceSession(model.SerializeToString()).run(["score"], {"features": queries})
    np.testing.assert_allclose(got, distance(queries), rtol=1e-4, atol=1e-5)


def test_the_threshold_keeps_the_asked_share_of_held_out_scores_below_it():
    scores = np.arange(1, 101, dtype=np.float32)
    assert ood.threshold(scores, 0.95) == 95.0
    assert np.mean(scores <= ood.threshold(scores, 0.95)) == 0.95


def test_auroc_counts_pairs_ordered_and_ties_as_half():
    assert ood.auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
    assert ood.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 0.0
    assert ood.auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert ood.auroc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5


def _retrain(tmp_path, shapes_dir, model_dir, name: str, **training) -> dict:
    return retrain_summary(shapes_dir, tmp_path, model_dir, name, 40, report=False, **training)


def test_label_says_unknown_above_the_threshold_and_a_flag_turns_it_off(
    tmp_path, shapes_dir, model_dir, capsys
):
    board = np.kron((np.indices((8, 8)).sum(axis=0) % 2) * 255, np.ones((28, 28))).astype(np.uint8)
    (tmp_path / "board.jpg").write_bytes(jpeg_bytes(Image.fromarray(board).convert("RGB")))
    square = shapes_dir / "blue_squares" / "img_000.jpg"
    images = [str(tmp_path / "board.jpg"), str(square)]

    summary = _retrain(tmp_path, shapes_dir, model_dir, "on", unknown_label="none of these")
    found = summary["trust"]["unknown"]
    assert found["recall"] == 0.95 and found["held_out_n"] == summary["images"]["validation"]
    assert 0 <= found["test_unknown_share"] <= 1 and found["output"] == "ood_score"
    board_said, square_said = label(str(tmp_path / "on" / "g.onnx"), images)
    assert board_said.unknown == "none of these" and board_said.ood_score > found["threshold"]
    assert len(board_said.top) == 3  # still scored
    assert square_said.unknown is None and square_said.top[0][0] == "blue squares"
    assert main(["label", "--graph", str(tmp_path / "on" / "g.onnx"), "--json", *images]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["unknown"], x["answer"]) for x in lines] == [(True, "none of these"), (False, "blue squares")]

    off = _retrain(tmp_path, shapes_dir, model_dir, "off", unknown_recall=0)
    assert off["trust"]["unknown"] is None
    model = RetrainedModel.load(str(tmp_path / "off" / "g.onnx"))
    assert model.info.unknown is None and len(model.session.get_outputs()) == 1
    assert label(str(tmp_path / "off" / "g.onnx"), images)[0].unknown is None
