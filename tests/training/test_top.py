"""``--train_top=head``: the hand-written gradients against finite differences, Adam, the exported model
against the numpy forward of the trained weights, and runs on local files (and Spark) that train the
head and export it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from helpers import FLOWERS, make_dataset, retrain_summary
from lastlayer.cli import main
from lastlayer.demo import demo_image_dir
from lastlayer.errors import UsageError
from lastlayer.model.export import build_classifier
from lastlayer.settings.run import TrainingConfig
from lastlayer.training.top import Adam, TopNet, exported, features_of, train_top
from lastlayer.training.train import Classifier, Standardizer, TrainConfig
from lastlayer.zoo import Backbones, load_backbones, load_feature_model
from lastlayer.zoo.top import HeadConv


def small_net(rng: np.random.Generator, dtype: type = np.float64) -> TopNet:
    """A top of 3 input channels, 4 positions, 5 outputs, 2 block features and 3 classes."""
    head = HeadConv(rng.normal(0, 1, (5, 3)), rng.normal(0, 0.5, 5), 4, "w", "b", 2)
    scaler = Standardizer(rng.normal(0, 1, 7), rng.uniform(0.5, 2, 7))
    return TopNet(
        head,
        head.weight.astype(dtype),
        head.bias.astype(dtype),
        rng.normal(0, 1, (7, 3)).astype(dtype),
        rng.normal(0, 1, 3).astype(dtype),
        scaler,
    )


def test_the_gradients_equal_finite_differences():
    rng = np.random.default_rng(0)
    net = small_net(rng)
    x = rng.uniform(0, 3, (6, 3 * 4 + 2))  # activations after a ReLU6 are >= 0
    y = rng.integers(0, 3, 6)
    _, grads = net.loss(x, y)
    eps = 1e-6
    for name, grad in grads.items():
        param = getattr(net, name)
        numeric = np.zeros_like(param)
        for i in np.ndindex(param.shape):
            keep = param[i]
            param[i] = keep + eps
            up, _ = net.loss(x, y)
            param[i] = keep - eps
            down, _ = net.loss(x, y)
            param[i] = keep
            numeric[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8, err_msg=name)
    assert np.abs(grads["weight"]).sum() > 0  # some pre-activations lie in (0, 6)


def test_the_features_are_the_pooled_relu6_of_the_1x1_convolution_then_the_block_features():
    rng = np.random.default_rng(1)
    net = small_net(rng)
    x = rng.uniform(0, 3, (2, 14))
    acts = x[:, :12].reshape(2, 3, 4)  # channel-major, as the top graph flattens [N, C, H, W]
    z = np.einsum("oc,ncp->nop", net.weight, acts) + net.bias[None, :, None]
    expected = np.hstack([np.clip(z, 0, 6).mean(axis=2), x[:, 12:]])
    np.testing.assert_allclose(features_of(net, x), expected, rtol=1e-12)


def test_adam_lowers_the_loss_of_a_fixed_batch():
    rng = np.random.default_rng(2)
    net = small_net(rng)
    x, y = rng.uniform(0, 3, (16, 14)), rng.integers(0, 3, 16)
    params = {k: getattr(net, k) for k in ("weight", "bias", "softmax_weight", "softmax_bias")}
    adam = Adam(params, dict.fromkeys(params, 0.05))
    first, _ = net.loss(x, y)
    for _ in range(100):
        adam.step(net.loss(x, y)[1])
    assert net.loss(x, y)[0] < first / 4


def test_training_the_top_learns_and_is_reproducible():
    rng = np.random.default_rng(3)
    head = HeadConv(
        rng.normal(0, 0.3, (32, 8)).astype(np.float32), np.full(32, 0.5, np.float32), 4, "w", "b", 3
    )
    y = rng.integers(0, 2, 64)
    acts = rng.uniform(0, 1, (64, head.channels, head.positions))
    acts[y == 1, :2] += 1.0  # the class shows in two channels
    x = np.hstack([acts.reshape(64, -1), rng.normal(0, 1, (64, head.blocks))]).astype(np.float32)
    config = TrainConfig(steps=60, learning_rate=0.01, train_batch_size=16, seed=0, log_steps=False)
    scaler = Standardizer.of(x)
    nets = [train_top(head, lambda pos, _rng: x[pos], y, 2, config, scaler) for _ in range(2)]
    np.testing.assert_array_equal(nets[0].weight, nets[1].weight)
    assert np.abs(nets[0].weight - head.weight).max() > 0.1  # the head was trained
    logits = nets[0].scaler(features_of(nets[0], x)) @ nets[0].softmax_weight + nets[0].softmax_bias
    assert np.mean(np.argmax(logits, axis=1) == y) > 0.9


def test_the_exported_model_computes_the_numpy_forward_of_the_trained_weights(model_dir):
    network = load_backbones("efficientnet_lite0", str(model_dir), None, True, "head")
    (model,) = network.models
    head = model.head
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    (rows,) = model.session(1).run(["features"], {"image": images})
    assert rows.dtype == np.float16 and rows.shape == (3, head.activations + head.blocks)
    net = TopNet(
        head,
        (head.weight * rng.uniform(0.5, 1.5, head.weight.shape)).astype(np.float32),
        (head.bias + rng.normal(0, 0.1, head.bias.shape)).astype(np.float32),
        np.zeros(0),
        np.zeros(0),
        Standardizer(np.zeros(1), np.ones(1)),
    )
    clf = Classifier(rng.normal(0, 0.05, (1280 + head.blocks, 4)).astype(np.float32), np.zeros(4, np.float32))
    carried = exported(network, net)
    graph = build_classifier(carried, clf, ("a", "b", "c", "d"))
    (probs,) = ort.InferenceSession(graph).run(["final_result"], {"image": images})
    logits = features_of(net, rows.astype(np.float32)) @ clf.weights + clf.biases
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=2e-3)  # the cached activations are float16
    untrained = build_classifier(Backbones((model.whole,)), clf, ("a", "b", "c", "d"))
    (before,) = ort.InferenceSession(untrained).run(["final_result"], {"image": images})
    assert np.abs(before - probs).max() > 1e-2  # the trained weights are the ones in the graph
    assert len(onnx.load_from_string(graph).graph.input) == 1


def test_only_one_float_zoo_network_has_a_head_to_train(model_dir, tmp_path):
    with pytest.raises(UsageError, match="one network"):
        load_backbones("mobilenet_v2_1.0_224+efficientnet_lite0", str(model_dir), None, True, "head")
    with pytest.raises(UsageError, match="int8"):
        load_feature_model("efficientnet_lite0_int8", str(model_dir), None, True, "head")
    with pytest.raises(UsageError, match="your own model"):
        load_feature_model(str(tmp_path / "mine.onnx"), str(model_dir), None, True, "head")
    with pytest.raises(UsageError, match="--train_top"):
        TrainingConfig(train_top="head", cross_validation=5)


def test_a_run_on_the_demo_set_trains_the_head_caches_float16_and_scores_well(model_dir, tmp_path):
    summary = retrain_summary(
        demo_image_dir(), tmp_path, model_dir, "head", 100, report=False, train_top="head"
    )
    assert summary["options"]["train_top"] == "head"
    assert summary["metrics"]["validation_and_test_accuracy"] >= 0.8  # 97.5% measured (40 images)
    folders = [p for p in (tmp_path / "b").iterdir() if p.is_dir()]
    cached = sum(f.stat().st_size for p in folders for f in p.glob("part-*.parquet"))
    assert 25_000 < cached / summary["cache"]["computed"] < 40_000  # float16 activations
    graph = onnx.load(str(tmp_path / "head" / "g.onnx"))
    imagenet = onnx.load_from_string(
        load_feature_model("efficientnet_lite0", str(model_dir), None, True).onnx_bytes
    )
    weights = [
        {t.name: onnx.numpy_helper.to_array(t) for t in g.graph.initializer}["_conv_head.weight"]
        for g in (graph, imagenet)
    ]
    assert np.abs(weights[0] - weights[1]).max() > 1e-3  # the model carries the trained head


@pytest.mark.slow
@pytest.mark.skipif(not FLOWERS.is_dir(), reason="the flower sample is not on this machine")
def test_the_flower_sample_with_a_trained_head(model_dir, tmp_path):
    summary = retrain_summary(FLOWERS, tmp_path, model_dir, "head", 100, report=False, train_top="head")
    assert summary["metrics"]["validation_and_test_accuracy"] >= 0.85


def test_the_spark_engine_caches_the_same_activations_and_gives_the_same_model(
    spark_session, model_dir, tmp_path
):
    data = make_dataset(tmp_path / "data", per_class=10)
    for engine in ("local", "spark"):
        argv = [
            "retrain",
            f"--image_dir={data}",
            f"--model_dir={model_dir}",
            f"--bottleneck_dir={tmp_path / engine / 'b'}",
            f"--output_graph={tmp_path / engine / 'g.onnx'}",
            f"--output_labels={tmp_path / engine / 'l.txt'}",
            f"--summaries_dir={tmp_path / engine / 's'}",
            "--how_many_training_steps=20",
            "--random_seed=1",
            "--train_top=head",
            "--report=false",
            f"--engine={engine}",
        ]
        assert main(argv) == 0
    summary = json.loads((tmp_path / "spark" / "g.summary.json").read_text())
    assert summary["options"]["engine"] == "spark" and summary["cache"]["computed"] == 30
    assert (tmp_path / "spark" / "g.onnx").read_bytes() == (tmp_path / "local" / "g.onnx").read_bytes()
