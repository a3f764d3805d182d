"""The retrained model: one self-contained ONNX file.

The feature network, then ``softmax(features @ W + b)``: input :data:`~lastlayer.contract.IMAGE`
``uint8 [N, S, S, 3]`` RGB, prepared as :mod:`lastlayer.preprocess` describes (the spec is in the
metadata); output ``<final_tensor_name>``: ``float32 [N, C]`` class probabilities. Metadata
(:mod:`lastlayer.contract`): labels (JSON list), preprocessing (JSON), architecture,
final_tensor_name, version and any extra entries (model_key, seed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import onnx
from onnx import helper, numpy_helper

from lastlayer import __version__, contract
from lastlayer.contract import FEATURES
from lastlayer.errors import ModelError
from lastlayer.train import Classifier
from lastlayer.zoo import FeatureModel


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
        contract.LABELS: json.dumps(list(labels), ensure_ascii=False),
        contract.PREPROCESSING: model.preprocessing.to_json(),
        contract.ARCHITECTURE: model.architecture,
        contract.FINAL_TENSOR_NAME: final_tensor_name,
        contract.VERSION: __version__,
        **(extra_metadata or {}),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = contract.meta_key(key)
        entry.value = value
    proto.producer_name = "lastlayer"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
