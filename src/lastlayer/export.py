"""The retrained model: one self-contained ONNX file.

Input ``image``: ``uint8 [N, S, S, 3]`` RGB, prepared as :mod:`lastlayer.preprocess` describes
(the spec is in the metadata); output ``<final_tensor_name>``: ``float32 [N, C]`` class
probabilities. Metadata (``metadata_props``): ``lastlayer.labels`` (JSON list),
``lastlayer.preprocessing`` (JSON), ``lastlayer.architecture``, ``lastlayer.final_tensor_name``,
``lastlayer.version``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from lastlayer import __version__
from lastlayer.errors import ModelError
from lastlayer.preprocess import Preprocessing
from lastlayer.train import Classifier
from lastlayer.zoo import FeatureModel

INPUT_NAME = "image"
FEATURES = "features"
META_PREFIX = "lastlayer."


def _prune(graph: onnx.GraphProto, keep: str) -> None:
    """Keep only the output ``keep`` and the nodes and initializers it depends on."""
    needed = {keep}
    nodes = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    kept_outputs = [o for o in graph.output if o.name == keep]
    kept_inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    del graph.output[:]
    graph.output.extend(kept_outputs)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)


def build_classifier(
    model: FeatureModel,
    classifier: Classifier,
    labels: Sequence[str],
    final_tensor_name: str = "final_result",
    extra_metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialized ONNX model: ``model``'s feature extractor, then ``softmax(x W + b)``."""
    proto = onnx.load_from_string(model.onnx_bytes)
    graph = proto.graph
    if FEATURES not in {o.name for o in graph.output}:
        raise ModelError(f"the feature model of {model.architecture} has no {FEATURES!r} output")
    _prune(graph, FEATURES)
    graph.initializer.extend(
        [
            numpy_helper.from_array(classifier.weights.astype("float32"), "final_weights"),
            numpy_helper.from_array(classifier.biases.astype("float32"), "final_biases"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Gemm", [FEATURES, "final_weights", "final_biases"], ["final_logits"]),
            helper.make_node("Softmax", ["final_logits"], [final_tensor_name], axis=-1),
        ]
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(final_tensor_name, onnx.TensorProto.FLOAT, [None, len(labels)])
    )
    meta = {
        "labels": json.dumps(list(labels), ensure_ascii=False),
        "preprocessing": model.preprocessing.to_json(),
        "architecture": model.architecture,
        "final_tensor_name": final_tensor_name,
        "version": __version__,
        **(extra_metadata or {}),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value
    proto.producer_name = "lastlayer"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@dataclass(frozen=True)
class ModelInfo:
    """What :mod:`lastlayer.label` needs from a retrained model's metadata."""

    labels: tuple[str, ...]
    preprocessing: Preprocessing
    architecture: str
    output_name: str


def read_info(proto: onnx.ModelProto, source: str) -> ModelInfo:
    """Read the metadata written by :func:`build_classifier`."""
    meta = {
        p.key.removeprefix(META_PREFIX): p.value
        for p in proto.metadata_props
        if p.key.startswith(META_PREFIX)
    }
    missing = [k for k in ("labels", "preprocessing") if k not in meta]
    if missing:
        raise ModelError(
            f"{source} has no {', '.join(META_PREFIX + k for k in missing)} metadata: "
            "it was not written by lastlayer retrain; retrain to get a model that carries its preprocessing"
        )
    try:
        labels = tuple(json.loads(meta["labels"]))
    except ValueError as exc:
        raise ModelError(f"{source}: invalid {META_PREFIX}labels metadata: {exc}") from exc
    return ModelInfo(
        labels=labels,
        preprocessing=Preprocessing.from_json(meta["preprocessing"]),
        architecture=meta.get("architecture", "unknown"),
        output_name=meta.get("final_tensor_name", proto.graph.output[0].name),
    )
