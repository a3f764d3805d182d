"""The retrained model: one self-contained ONNX file.

The feature network, then ``softmax(features @ W + b)``: input :data:`~lastlayer.model.contract.IMAGE`
``uint8 [N, S, S, 3]`` RGB, prepared as :mod:`lastlayer.preprocess` describes (the spec is in the
metadata); output ``<final_tensor_name>``: ``float32 [N, C]`` class probabilities. An ensemble
(``--architecture a+b``) has one input per network, ``image_0``, ``image_1``, ... (see
:func:`lastlayer.model.contract.input_name`), each prepared with its own network's preprocessing, and
their features concatenated before the softmax layer. Metadata (:mod:`lastlayer.model.contract`): labels
(JSON list), preprocessing (JSON, the first input's), inputs (JSON: each input's name,
architecture and preprocessing), architecture, final_tensor_name, version and any extra entries
(model_key, seed). With a "none of the above" score (:mod:`lastlayer.trust.ood`), a second output
``float32 [N]`` and the ``unknown`` metadata (its name, threshold and word).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx
import onnx.compose
from onnx import helper, numpy_helper

from lastlayer import storage
from lastlayer.errors import ModelError
from lastlayer.model import contract
from lastlayer.model.contract import FEATURES
from lastlayer.training.train import Classifier
from lastlayer.trust.ood import ExportedDistance, onnx_nodes
from lastlayer.version import __version__
from lastlayer.zoo import Backbones, FeatureModel
from lastlayer.zoo.graph import prune

if TYPE_CHECKING:
    from lastlayer.settings.run import OutputConfig

#: The run's lines keep the logger name they always had (``INFO:lastlayer.retrain:Save final result to``).
log = logging.getLogger("lastlayer.retrain")


def _features_graph(model: FeatureModel) -> onnx.ModelProto:
    """``model``'s graph reduced to ``image -> features``."""
    proto = onnx.load_from_string(model.onnx_bytes)
    if FEATURES not in {o.name for o in proto.graph.output}:
        raise ModelError(f"the feature model of {model.architecture} has no {FEATURES!r} output")
    prune(proto.graph, FEATURES)
    return proto


def _branches(models: Backbones) -> onnx.ModelProto:
    """One graph of every branch: inputs named by :func:`contract.input_name`, output ``features``
    (the branches' features concatenated)."""
    if len(models) == 1:
        return _features_graph(models.models[0])
    parts = [onnx.compose.add_prefix(_features_graph(m), f"branch{i}/") for i, m in enumerate(models)]
    proto = parts[0]
    graph = proto.graph
    for part in parts[1:]:
        graph.node.extend(part.graph.node)
        graph.initializer.extend(part.graph.initializer)
        graph.input.extend(part.graph.input)
    outputs = [part.graph.output[0].name for part in parts]
    graph.node.append(helper.make_node("Concat", outputs, [FEATURES], name="concat_features", axis=1))
    for i, value in enumerate(graph.input):
        old, value.name = value.name, contract.input_name(i, len(parts))
        for node in graph.node:
            node.input[:] = [value.name if name == old else name for name in node.input]
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, [None, models.feature_size])
    )
    return proto


def build_classifier(
    model: Backbones,
    classifier: Classifier,
    labels: Sequence[str],
    final_tensor_name: str = "final_result",
    extra_metadata: Mapping[str, str] | None = None,
    unknown: ExportedDistance | None = None,
    thresholds: Sequence[float] | None = None,
) -> bytes:
    """Serialized ONNX model: ``model``'s feature extractors, then ``softmax(x W + b)`` (with
    ``thresholds``, a multi-label model: ``sigmoid(x W + b)`` and the thresholds in its metadata), and
    with ``unknown`` its score as a second output."""
    proto = _branches(model)
    graph = proto.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(classifier.weights.astype("float32"), "final_weights"),
            numpy_helper.from_array(classifier.biases.astype("float32"), "final_biases"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Gemm", [FEATURES, "final_weights", "final_biases"], ["final_logits"]),
            helper.make_node("Sigmoid", ["final_logits"], [final_tensor_name])
            if thresholds is not None
            else helper.make_node("Softmax", ["final_logits"], [final_tensor_name], axis=-1),
        ]
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(final_tensor_name, onnx.TensorProto.FLOAT, [None, len(labels)])
    )
    if unknown is not None:
        nodes, tensors = onnx_nodes(unknown.distance, FEATURES, unknown.meta.output)
        graph.node.extend(nodes)
        graph.initializer.extend(tensors)
        graph.output.append(
            helper.make_tensor_value_info(unknown.meta.output, onnx.TensorProto.FLOAT, [None])
        )
    inputs = [
        {
            "name": contract.input_name(i, len(model)),
            "architecture": m.architecture,
            "preprocessing": m.preprocessing.to_json(),
        }
        for i, m in enumerate(model)
    ]
    meta = {
        contract.LABELS: json.dumps(list(labels), ensure_ascii=False),
        contract.PREPROCESSING: model.models[0].preprocessing.to_json(),
        contract.INPUTS: json.dumps(inputs),
        contract.ARCHITECTURE: model.architecture,
        contract.FINAL_TENSOR_NAME: final_tensor_name,
        contract.VERSION: __version__,
        **(extra_metadata or {}),
        **({contract.UNKNOWN: json.dumps(dataclasses.asdict(unknown.meta))} if unknown else {}),
        **({} if thresholds is None else {contract.THRESHOLDS: json.dumps([float(t) for t in thresholds])}),
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


def write_model(
    model: Backbones,
    clf: Classifier,
    labels: tuple[str, ...],
    outputs: OutputConfig,
    seed: int,
    storage_options: Mapping[str, Any] | None,
    network: Backbones | None = None,
    unknown: ExportedDistance | None = None,
    thresholds: Sequence[float] | None = None,
) -> None:
    """Write the retrained model (carrying its labels and preprocessing) and the labels file.

    Args:
        model: the network(s) whose features trained ``clf`` (their key goes into the metadata).
        network: the network(s) the model carries, when not ``model`` (``--quantize_output_graph``).
        unknown: its "none of the above" score, when on.
        thresholds: a multi-label model's per-label thresholds (``--multi_label``).
    """
    extra = {contract.MODEL_KEY: model.key, contract.SEED: str(seed)}
    model_bytes = build_classifier(
        network or model, clf, labels, outputs.final_tensor_name, extra, unknown, thresholds
    )
    storage.write_atomic(outputs.output_graph, model_bytes, storage_options)
    log.info("Save final result to : %s", outputs.output_graph)
    storage.write_atomic(outputs.output_labels, ("\n".join(labels) + "\n").encode(), storage_options)
