"""The better last layer: standardization folded into the weights, sampling, the extra scores,
cross-validation, ensembles whose exported model reproduces the training features, and distorted
variants planned from the sampler's draws."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import make_dataset
from lastlayer import pipeline
from lastlayer.bottlenecks.keys import distortion_key
from lastlayer.bottlenecks.needs import compute_bottlenecks
from lastlayer.bottlenecks.store import FeatureStore
from lastlayer.dataset import TRAINING, scan
from lastlayer.engines.local import LocalEngine
from lastlayer.errors import DataError, UsageError
from lastlayer.model import contract
from lastlayer.model.inference import RetrainedModel
from lastlayer.preprocess import decode
from lastlayer.settings.run import CacheConfig, OutputConfig, TrainingConfig
from lastlayer.training.data import folds
from lastlayer.training.evaluate import balanced_accuracy, largest_share, macro_f1
from lastlayer.training.train import Classifier, Sampler, Standardizer, TrainConfig, draw_counts, train
from lastlayer.zoo import load_backbones, load_feature_model
from lastlayer.zoo.backbones import split_architecture

ENSEMBLE = "mobilenet_v2_1.0_128+efficientnet_lite0"


def test_standardization_folds_into_the_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, (50, 6)).astype(np.float32) * np.array([1, 10, 0.1, 1, 1, 1], np.float32)
    x[:, 3] = 2.0  # constant: centred only
    scaler = Standardizer.of(x)
    assert np.allclose(scaler(x)[:, [0, 1, 2, 4]].std(axis=0), 1, atol=1e-4) and scaler.scale[3] == 1
    clf = Classifier(rng.normal(0, 1, (6, 3)).astype(np.float32), rng.normal(0, 1, 3).astype(np.float32))
    raw = scaler.fold(clf)
    assert np.allclose(raw.logits(x), clf.logits(scaler(x)), atol=1e-4)


def test_uniform_sampling_follows_the_class_mix_and_balanced_sampling_evens_it():
    labels = np.array([0] * 90 + [1] * 10)
    rng = np.random.default_rng(0)
    uniform = labels[Sampler(labels, 2, balanced=False)(20000, rng)]
    balanced = labels[Sampler(labels, 2, balanced=True)(20000, rng)]
    assert abs(uniform.mean() - 0.1) < 0.01 and abs(balanced.mean() - 0.5) < 0.02
    assert np.array_equal(Sampler(labels, 2, balanced=False)(-1, rng), np.arange(100))


def test_on_an_imbalanced_set_the_default_beats_the_largest_class_and_balancing_raises_rare_recall():
    rng = np.random.default_rng(1)
    y = np.array([0] * 900 + [1] * 100)
    x = (np.eye(2, 4)[y] * 1.2 + rng.normal(0, 1, (1000, 4))).astype(np.float32)
    vy = np.array([0] * 450 + [1] * 50)
    vx = (np.eye(2, 4)[vy] * 1.2 + rng.normal(0, 1, (500, 4))).astype(np.float32)

    def fit(balanced: bool) -> np.ndarray:
        config = TrainConfig(steps=300, learning_rate=0.1, balance_classes=balanced, log_steps=False)
        clf = train(
            lambda pos, _: x[pos],
            y,
            lambda pos: vx[pos],
            vy[:0],
            4,
            2,
            config,
            standardizer=Standardizer.of(x),
        )
        return clf.predict(vx)

    uniform, balanced = fit(False), fit(True)
    assert np.mean(uniform == vy) > largest_share(vy, 2) > np.mean(balanced == vy)
    assert np.mean(balanced[vy == 1] == 1) > np.mean(uniform[vy == 1] == 1) + 0.2


def test_draw_counts_replay_the_training_draws():
    y = np.array([0, 0, 0, 1, 1, 2] * 5)
    config = TrainConfig(steps=7, train_batch_size=4, seed=3)
    drawn: list[np.ndarray] = []
    train(
        lambda pos, _: drawn.append(pos) or np.eye(3, dtype=np.float32)[y[pos]],
        y,
        lambda pos: np.zeros((0, 3)),
        y[:0],
        3,
        3,
        config,
    )
    assert np.array_equal(draw_counts(y, 3, config), np.bincount(np.concatenate(drawn), minlength=len(y)))


def test_scores_of_a_confusion_matrix():
    confusion = np.array([[8, 2, 0], [1, 1, 0], [0, 0, 0]])
    assert balanced_accuracy(confusion) == pytest.approx((0.8 + 0.5) / 2)
    assert macro_f1(confusion) == pytest.approx((2 * 8 / (10 + 9) + 2 * 1 / (2 + 3)) / 2)
    assert (
        balanced_accuracy(np.zeros((2, 2), np.int64)) is None
        and largest_share(np.zeros(0, np.int64), 2) is None
    )
    assigned = folds(np.array([0] * 10 + [1] * 5), 5, seed=1)
    assert [np.bincount(assigned[:10]).tolist(), np.bincount(assigned[10:], minlength=5).tolist()] == [
        [2] * 5,
        [1] * 5,
    ]


def test_architecture_lists_are_checked():
    assert split_architecture("a+b") == ["a", "b"] and split_architecture("dir/my+model.onnx") == [
        "dir/my+model.onnx"
    ]
    with pytest.raises(UsageError, match="empty name"):
        split_architecture("a++b")
    with pytest.raises(UsageError, match="appears twice"):
        split_architecture("a+a")


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(tmp / "data", per_class=12)
    out = tmp / "out"
    summary = pipeline.retrain(
        str(data),
        architecture=ENSEMBLE,
        training=TrainingConfig(how_many_training_steps=40, random_seed=2, cross_validation=3),
        cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(tmp / "b")),
        outputs=OutputConfig(
            output_graph=str(out / "g.onnx"), output_labels=str(out / "l.txt"), summaries_dir=str(out / "s")
        ),
    )
    return tmp, data, summary


def test_an_ensemble_model_reproduces_the_training_features(ensemble_run, model_dir):
    tmp, data, summary = ensemble_run
    assert summary.architecture == ENSEMBLE
    models = load_backbones(ENSEMBLE, str(model_dir), block_features=True)  # as the run, by default
    images = scan(str(data), 10, 10)
    cached = np.hstack(
        [
            compute_bottlenecks(images, m, str(tmp / "b"), LocalEngine()).read(np.arange(len(images.files)))
            for m in models
        ]
    )
    proto = onnx.load(str(tmp / "out" / "g.onnx"))
    assert [i.name for i in proto.graph.input] == ["image_0", "image_1"]
    inputs = json.loads(contract.metadata(proto)[contract.INPUTS])
    assert [i["architecture"] for i in inputs] == ENSEMBLE.split("+")
    proto.graph.output.append(helper.make_tensor_value_info(contract.FEATURES, onnx.TensorProto.FLOAT, None))
    (tmp / "f.onnx").write_bytes(proto.SerializeToString())
    model = RetrainedModel.load(str(tmp / "f.onnx"))
    prepared = [model.prepare(Path(f.url).read_bytes()) for f in images.files]
    assert [p.shape for p in prepared[0]] == [(128, 128, 3), (224, 224, 3)]
    feed = {name: np.stack([p[i] for p in prepared]) for i, (name, _) in enumerate(model.info.inputs)}
    (at_label_time,) = model.session.run([contract.FEATURES], feed)
    np.testing.assert_allclose(at_label_time, cached, atol=1e-4, rtol=0)
    probs = RetrainedModel.load(str(tmp / "out" / "g.onnx")).probabilities(prepared[:3])
    assert probs.shape == (3, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_the_summary_holds_the_new_scores_and_the_cross_validation(ensemble_run):
    _tmp, _data, summary = ensemble_run
    metrics = json.loads(summary.to_json())["metrics"]
    assert metrics["largest_class"] in summary.labels and 0 < metrics["largest_class_share"] <= 1
    assert 0 <= metrics["test_balanced_accuracy"] <= 1 and 0 <= metrics["test_macro_f1"] <= 1
    cv = metrics["cross_validation"]
    assert cv["folds"] == 3 and cv["images"] == 36 and cv["accuracy"]["mean"] > 0.8
    assert set(cv["balanced_accuracy"]) == {"mean", "std"} and "cross_validation_s" in summary.timings


def test_distorted_variants_are_only_those_training_draws(tmp_path, model_dir, caplog):
    data = make_dataset(tmp_path / "data", per_class=8)
    out = tmp_path / "out"
    training = TrainingConfig(
        how_many_training_steps=2, train_batch_size=3, random_seed=4, flip_left_right=True
    )
    with caplog.at_level(logging.INFO):
        summary = pipeline.retrain(
            str(data),
            architecture="mobilenet_v2_1.0_128",
            training=training,
            cache=CacheConfig(
                model_dir=str(model_dir), bottleneck_dir=str(tmp_path / "b"), distorted_variants=5
            ),
            outputs=OutputConfig(
                output_graph=str(out / "g.onnx"),
                output_labels=str(out / "l.txt"),
                summaries_dir=str(out / "s"),
            ),
        )
    images = scan(str(data), 10, 10)
    labels = np.array([f.label_index for f in images.files if f.split == TRAINING])
    config = TrainConfig(steps=2, train_batch_size=3, seed=4)
    draws = draw_counts(labels, 3, config)
    expected = int(np.minimum(draws, 5).sum())
    assert 0 < expected <= 6
    model = load_feature_model("mobilenet_v2_1.0_128", str(model_dir), block_features=True)
    folder = tmp_path / "b" / model.key[:16] / distortion_key(training.distortions)
    assert len(FeatureStore(str(folder), model.feature_size)) == expected
    # (issue 13.3) no plain pass for training images: the network ran for the validation and test images
    # and for the training images drawn, nothing else
    assert summary.cache.computed == len(images.files) - len(labels) + int((draws > 0).sum())


def test_block_features_extend_the_plain_features_in_the_same_pass(model_dir, shapes_dir):
    plain = load_feature_model("mobilenet_v2_1.0_128", str(model_dir))
    blocks = load_feature_model("mobilenet_v2_1.0_128", str(model_dir), block_features=True)
    assert blocks.feature_size == 1280 + 712 and blocks.key != plain.key
    photo = next(shapes_dir.rglob("*.jpg")).read_bytes()
    x = decode(photo, plain.preprocessing)[None]
    (a,) = plain.session().run([contract.FEATURES], {contract.IMAGE: x})
    (b,) = blocks.session().run([contract.FEATURES], {contract.IMAGE: x})
    assert b.shape == (1, 1992) and np.array_equal(a, b[:, :1280])
    again = load_feature_model("mobilenet_v2_1.0_128", str(model_dir), block_features=True)
    assert again.feature_size == 1992 and again.key == blocks.key  # from the cache
    assert len({p.name for p in model_dir.glob("mobilenet_v2_1.0_128-*.onnx")}) == 2


def test_block_features_reach_every_network_of_an_ensemble(model_dir):
    models = load_backbones("mobilenet_v2_1.0_128+mobilenet_v2_1.0_160", str(model_dir), block_features=True)
    assert [m.feature_size for m in models] == [1992, 1992] and models.feature_size == 3984


def test_more_folds_than_images_is_a_data_error(tmp_path, model_dir):
    data = make_dataset(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=r"--cross_validation=50 needs at least 50 usable images, and there are 12"
    ):
        pipeline.retrain(
            str(data),
            architecture="mobilenet_v2_1.0_128",
            training=TrainingConfig(how_many_training_steps=2, cross_validation=50),
            cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(tmp_path / "b")),
            outputs=OutputConfig(output_graph=str(out / "g.onnx"), summaries_dir=str(out / "s")),
        )
