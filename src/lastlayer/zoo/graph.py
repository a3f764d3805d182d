"""Graph surgery shared by zoo and user models: the uint8 input prefix and tensor renaming."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lastlayer.errors import ModelError
from lastlayer.model.contract import IMAGE
from lastlayer.preprocess import Preprocessing

LAYOUTS = ("NCHW", "NHWC")

#: Oldest default-domain opset whose Sub/Div broadcast numpy-style.
MIN_OPSET = 7


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name used in ``graph`` and its subgraphs."""
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info)}
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    for sub in _subgraphs(graph):
        names |= tensor_names(sub)
    names.discard("")
    return names


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph`` and its subgraphs, in place."""
    for value in itertools.chain(graph.input, graph.output, graph.value_info, graph.initializer):
        if value.name == old:
            value.name = new
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new
    for sub in _subgraphs(graph):
        rename_tensor(sub, old, new)


def fresh_name(base: str, used: set[str]) -> str:
    """``base``, or ``base.1``, ``base.2``... whichever is not in ``used``; the result is added to it."""
    name = base
    for i in itertools.count(1):
        if name not in used:
            break
        name = f"{base}.{i}"
    used.add(name)
    return name


def image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The single graph input that is not an initializer.

    Raises:
        ModelError: there is not exactly one.
    """
    constants = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in constants]
    if len(inputs) != 1:
        names = ", ".join(v.name for v in inputs) or "none"
        raise ModelError(f"the model has {len(inputs)} inputs ({names}); expected exactly one image input")
    return inputs[0]


def dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """The shape of a tensor value: ints for fixed dims, names for symbolic ones, None if unknown."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def describe(value: onnx.ValueInfoProto) -> str:
    """E.g. ``float32 [N, 3, 224, 224]`` for error messages."""
    tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if tensor is None:
        return f"a non-tensor value ({value.type.WhichOneof('value')})"
    dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown type"
    shape = dims(value)
    text = (
        "unknown shape"
        if shape is None
        else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    )
    return f"{dtype} {text}"


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset version of the default ONNX domain."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _planar(values: tuple[float, float, float]) -> onnx.TensorProto:
    """Per-channel constants shaped ``[3, 1, 1]`` to broadcast over NCHW."""
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32).reshape(3, 1, 1))


def attach_preprocessing(core: onnx.ModelProto, prep: Preprocessing, layout: str) -> onnx.ModelProto:
    """Prefix ``core`` so that it takes ``image``: uint8 ``[N, size, size, 3]`` RGB.

    The prefix transposes to ``[N, 3, size, size]``, casts to float32 and computes
    ``(x - mean) / std`` per channel (0..255 scale); for ``layout == "NHWC"`` it transposes back.
    Its result feeds the core's single input. The core's outputs are untouched; ``core`` itself is
    not modified.

    Raises:
        ModelError: the core's input is not float32 4-D in ``layout`` at ``prep.size``, or its opset is
            older than 7.
    """
    if layout not in LAYOUTS:
        raise ModelError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if default_opset(core) < MIN_OPSET:
        raise ModelError(
            f"the model uses ONNX opset {default_opset(core)}; opset {MIN_OPSET} or newer is needed"
        )
    model = onnx.ModelProto()
    model.CopyFrom(core)
    graph = model.graph
    source = image_input(graph)
    shape = dims(source)
    expected = [3, prep.size, prep.size] if layout == "NCHW" else [prep.size, prep.size, 3]
    if source.type.tensor_type.elem_type != TensorProto.FLOAT or shape is None or len(shape) != 4:
        raise ModelError(f"the model input is {describe(source)}; expected float32 {layout}")
    if any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True)):
        raise ModelError(
            f"the model input is {describe(source)}; expected {layout} {expected} for {prep.size} px"
        )
    used = tensor_names(graph)
    if IMAGE in used:
        rename_tensor(graph, IMAGE, fresh_name(f"{IMAGE}.core", used))
    used.add(IMAGE)
    target = source.name
    batch = onnx.TensorShapeProto.Dimension()
    batch.CopyFrom(source.type.tensor_type.shape.dim[0])
    names = {part: fresh_name(f"image.{part}", used) for part in ("nchw", "mean", "std", "float", "centred")}
    scaled = target if layout == "NCHW" else fresh_name("image.scaled", used)
    # Per-channel arithmetic runs on planar NCHW data: broadcasting over a trailing axis of 3 is
    # several times slower in onnxruntime than the uint8 transpose.
    prefix = [
        helper.make_node("Transpose", [IMAGE], [names["nchw"]], name=names["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Cast", [names["nchw"]], [names["float"]], name=names["float"], to=TensorProto.FLOAT
        ),
        helper.make_node("Constant", [], [names["mean"]], name=names["mean"], value=_planar(prep.mean)),
        helper.make_node("Constant", [], [names["std"]], name=names["std"], value=_planar(prep.std)),
        helper.make_node("Sub", [names["float"], names["mean"]], [names["centred"]], name=names["centred"]),
        helper.make_node("Div", [names["centred"], names["std"]], [scaled], name=scaled),
    ]
    if layout == "NHWC":
        prefix.append(helper.make_node("Transpose", [scaled], [target], name=target, perm=[0, 2, 3, 1]))
    nodes = [*prefix, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    image = helper.make_tensor_value_info(IMAGE, TensorProto.UINT8, [None, prep.size, prep.size, 3])
    image.type.tensor_type.shape.dim[0].CopyFrom(batch)
    inputs = [image if v.name == target else v for v in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def prune(graph: onnx.GraphProto, keep: str) -> None:
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
