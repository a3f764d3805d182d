"""The top of a zoo network for ``--train_top=head``: the graph that stops before the head convolution
(its input activations are the features cached), the head's ImageNet weights, and the network with
trained head weights put in their place.

A zoo graph (:mod:`lastlayer.zoo.networks`) ends ``Conv`` (the 1x1 head, batch norm folded) →
``Clip`` (ReLU6) → ``GlobalAveragePool`` → ``Flatten`` to ``features`` (or to ``pooled``, concatenated
with the block groups' pooled outputs into ``features``). The top graph's ``features`` are instead
the head's input flattened, ``[N, C·H·W]`` in channel-major order (7·7·320 = 15,680 values for
EfficientNet-Lite0 and MobileNetV2 at 224 px), followed by the pooled block outputs, as float16:
31 KB per image instead of the 8 KB of the pooled features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lastlayer.errors import ModelError
from lastlayer.model.contract import FEATURES
from lastlayer.zoo.graph import prune

#: ``--train_top`` values: the frozen network, or its head convolution trained too.
NONE, HEAD = "none", "head"
TOPS = (NONE, HEAD)
#: The pooled head output before the block features are concatenated (see networks._GraphBuilder.head).
POOLED = "pooled"


@dataclass(frozen=True, eq=False)  # (arrays: compared by identity)
class HeadConv:
    """A network's 1x1 head convolution (batch norm folded), as the top graph leaves it out.

    Attributes:
        weight: ``float32 [C_out, C_in]`` (ImageNet's, folded).
        bias: ``float32 [C_out]``.
        positions: H·W, the spatial positions of its input (49 at 224 px).
        weight_name, bias_name: their initializers in the network's graph.
        blocks: the pooled block features after the activations in a top graph's ``features``.
    """

    weight: np.ndarray
    bias: np.ndarray
    positions: int
    weight_name: str
    bias_name: str
    blocks: int

    @property
    def channels(self) -> int:
        """C_in: the channels of the head's input."""
        return int(self.weight.shape[1])

    @property
    def activations(self) -> int:
        """C_in·H·W: the activation values of one image."""
        return self.channels * self.positions


def _producer(graph: onnx.GraphProto, tensor: str, op: str) -> onnx.NodeProto:
    node = next((n for n in graph.node if tensor in n.output), None)
    if node is None or node.op_type != op:
        raise ModelError(f"the network's head is not the expected {op} before {tensor!r}: no --train_top")
    return node


def _head_nodes(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """The head ``Conv`` and the ``Flatten`` of its pooled output (named ``features`` or ``pooled``)."""
    flatten = next(
        (n for n in graph.node if n.op_type == "Flatten" and n.output[0] in (FEATURES, POOLED)), None
    )
    if flatten is None:
        raise ModelError("the network has no pooled head output: no --train_top for it")
    pool = _producer(graph, flatten.input[0], "GlobalAveragePool")
    clip = _producer(graph, pool.input[0], "Clip")
    return _producer(graph, clip.input[0], "Conv"), flatten


def head_conv(model: onnx.ModelProto, feature_size: int) -> HeadConv:
    """The head convolution of a zoo network's graph whose ``features`` have ``feature_size`` values.

    Raises:
        ModelError: the graph does not end as a zoo network does.
    """
    conv, _ = _head_nodes(model.graph)
    tensors = {t.name: t for t in model.graph.initializer}
    if len(conv.input) < 3 or conv.input[1] not in tensors or conv.input[2] not in tensors:
        raise ModelError("the network's head convolution has no constant weights: no --train_top for it")
    weight = numpy_helper.to_array(tensors[conv.input[1]])
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        raise ModelError(f"the network's head convolution is {weight.shape}, not 1x1: no --train_top for it")
    shape = _activation_shape(model, conv.input[0])
    return HeadConv(
        weight[:, :, 0, 0].astype(np.float32),
        numpy_helper.to_array(tensors[conv.input[2]]).astype(np.float32),
        shape[1] * shape[2],
        conv.input[1],
        conv.input[2],
        feature_size - weight.shape[0],
    )


def _activation_shape(model: onnx.ModelProto, tensor: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``tensor``, by ONNX shape inference at the graph's fixed input size."""
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in inferred.graph.value_info:
        if value.name == tensor:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            if len(dims) == 4 and all(dims[1:]):
                return dims[1], dims[2], dims[3]
    raise ModelError(f"the shape of the head's input {tensor!r} is unknown: no --train_top for it")


def top_graph(model: onnx.ModelProto, head: HeadConv) -> onnx.ModelProto:
    """``model`` (``image`` → ``features``, ``logits``) cut before its head: ``image`` → ``features``
    float16 ``[N, C_in·H·W + blocks]``, the head's input activations then the block features."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    conv, flatten = _head_nodes(graph)
    flat = "top.activations"
    cut = helper.make_node("Flatten", [conv.input[0]], [flat], name="top/flatten", axis=1)
    nodes = [cut if n is flatten else n for n in graph.node]  # where the pooled output was: before Concat
    joined = flat
    if head.blocks:
        concat = next(n for n in nodes if n.op_type == "Concat" and n.output[0] == FEATURES)
        concat.input[0] = flat
        concat.output[0] = joined = "top.joined"
    nodes.append(helper.make_node("Cast", [joined], [FEATURES], name="top/float16", to=TensorProto.FLOAT16))
    del graph.node[:]
    graph.node.extend(nodes)
    width = head.activations + head.blocks
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT16, ["N", width]))
    prune(graph, FEATURES)  # the head, its pool and the ImageNet classifier
    return out


def with_head(model_bytes: bytes, head: HeadConv, weight: np.ndarray, bias: np.ndarray) -> bytes:
    """The network ``model_bytes`` with its head convolution's weights replaced by ``weight``
    ``float32 [C_out, C_in]`` and ``bias`` ``[C_out]`` (trained by ``--train_top=head``)."""
    model = onnx.load_from_string(model_bytes)
    replaced = {
        head.weight_name: weight.astype(np.float32)[:, :, None, None],
        head.bias_name: bias.astype(np.float32),
    }
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name in replaced:
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(replaced.pop(tensor.name), tensor.name)
            )
    if replaced:
        raise ModelError(f"the network has no initializer {', '.join(replaced)}: not the network trained")
    return model.SerializeToString()
