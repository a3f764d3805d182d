"""Labelling images with a retrained model, alone: labels from the model or a file, refusals, bad images,
batches, and the model contract's metadata and session factory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import make_dataset
from lastlayer.errors import ModelError, UsageError
from lastlayer.model import contract, runtime
from lastlayer.model.export import build_classifier
from lastlayer.model.inference import BATCH, label
from lastlayer.preprocess import decode
from lastlayer.training.train import Classifier
from lastlayer.zoo import DEFAULT_ARCHITECTURE, Backbones, load_feature_model


@pytest.fixture(scope="module")
def feature_model(model_dir):
    return load_feature_model(DEFAULT_ARCHITECTURE, str(model_dir))


@pytest.fixture(scope="module")
def classifier(feature_model):
    rng = np.random.default_rng(0)
    return Classifier(
        rng.normal(0, 0.05, (feature_model.feature_size, 3)).astype(np.float32), np.zeros(3, np.float32)
    )


@pytest.fixture(scope="module")
def graph(tmp_path_factory, feature_model, classifier):
    path = tmp_path_factory.mktemp("m") / "m.onnx"
    path.write_bytes(
        build_classifier(
            Backbones((feature_model,)), classifier, ("a", "b", "c"), "final_result", {"seed": "1"}
        )
    )
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("photos"), per_class=12)


def test_the_exported_model_is_features_then_softmax_with_its_metadata(
    graph, feature_model, classifier, photos
):
    proto = onnx.load(str(graph))
    info = contract.read_info(proto, "m")
    assert info.labels == ("a", "b", "c") and info.architecture == DEFAULT_ARCHITECTURE
    assert info.output_name == "final_result" and info.preprocessing == feature_model.preprocessing
    assert contract.metadata(proto)["seed"] == "1"
    x = decode((photos / "blue_squares" / "img_000.jpg").read_bytes(), info.preprocessing)[None]
    (features,) = feature_model.session(1).run([contract.FEATURES], {contract.IMAGE: x})
    logits = features @ classifier.weights + classifier.biases
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    (probs,) = runtime.session(graph.read_bytes(), "m", 1).run(["final_result"], {contract.IMAGE: x})
    assert np.allclose(probs, expected, atol=1e-5)


def test_label_sorts_scores_and_batches_many_images(graph, photos):
    images = sorted(str(p) for p in photos.rglob("*.jpg"))
    assert len(images) > BATCH
    predictions = label(str(graph), images, top_k=2)
    assert [p.image for p in predictions] == images
    for p in predictions:
        assert len(p.top) == 2 and p.top[0][1] >= p.top[1][1] and p.error is None


def test_a_labels_file_replaces_the_model_s_labels_when_it_matches(graph, photos, tmp_path):
    image = str(photos / "Red Circles" / "img_000.jpg")
    (tmp_path / "labels.txt").write_text("x\ny\nz\n")
    (p,) = label(str(graph), [image], labels=str(tmp_path / "labels.txt"), top_k=3)
    assert {name for name, _ in p.top} == {"x", "y", "z"}
    (tmp_path / "two.txt").write_text("x\ny\n")
    with pytest.raises(ModelError, match=r"two.txt has 2 labels but .* has 3 classes"):
        label(str(graph), [image], labels=str(tmp_path / "two.txt"))


def test_an_unreadable_image_is_reported_and_the_others_labelled(graph, photos, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    good = str(photos / "Red Circles" / "img_001.jpg")
    bad, ok = label(str(graph), [str(tmp_path / "broken.jpg"), good])
    assert bad.error and not bad.top and ok.error is None and ok.top


def test_refusals_are_model_errors(graph, tmp_path, feature_model):
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(ModelError, match="is not an ONNX model"):
        label(str(tmp_path / "junk.onnx"), ["x.jpg"])
    (tmp_path / "features.onnx").write_bytes(feature_model.onnx_bytes)
    with pytest.raises(ModelError, match="was not written by lastlayer retrain"):
        label(str(tmp_path / "features.onnx"), ["x.jpg"])
    with pytest.raises(ModelError, match=r"has no output 'nope'"):
        label(str(graph), ["x.jpg"], output_layer="nope")
    proto = onnx.load(str(graph))
    for p in proto.metadata_props:
        if p.key == contract.meta_key(contract.LABELS):
            p.value = "[not json"
    with pytest.raises(ModelError, match=r"invalid lastlayer\.labels metadata"):
        contract.read_info(proto, "m")


def test_the_session_factory_says_which_model_it_cannot_load():
    with pytest.raises(ModelError, match="onnxruntime cannot load my model"):
        runtime.session(b"garbage", "my model")
    with pytest.raises(UsageError, match="threads must be 0"):
        runtime.session(b"", "x", -1)
    assert contract.meta_key("labels") == "lastlayer.labels"
