"""User ONNX feature extractors: check the contract in docs/custom-models.md and wrap the model.

The contract: one float32 image input, NCHW ``[N, 3, S, S]`` or NHWC ``[N, S, S, 3]`` with a fixed
``S`` and a dynamic ``N``; the first output is the feature tensor, ``[N, D]`` or ``[N, D, 1, 1]``;
preprocessing from the ``lastlayer.preprocessing`` metadata entry, else ImageNet mean/std with a
0.875 centre crop at ``S`` px.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from lastlayer.errors import DataError, ModelError
from lastlayer.model import contract, runtime
from lastlayer.model.contract import FEATURES, IMAGE
from lastlayer.preprocess import Preprocessing
from lastlayer.zoo.catalog import IMAGENET_MEAN, IMAGENET_STD
from lastlayer.zoo.graph import (
    attach_preprocessing,
    describe,
    dims,
    fresh_name,
    image_input,
    rename_tensor,
    tensor_names,
)

DEFAULT_CENTRAL_FRACTION = 0.875

_EXPECTED_INPUT = "expected float32 [N, 3, S, S] (NCHW) or [N, S, S, 3] (NHWC) with a fixed size S"
_EXPECTED_OUTPUT = "expected the features as float32 [N, D] or [N, D, 1, 1]"


def _layout(value: onnx.ValueInfoProto) -> tuple[str, int]:
    """``(layout, S)`` of the image input, from its declared shape."""
    if value.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(f"the input {value.name!r} is {describe(value)}; {_EXPECTED_INPUT}")
    shape = dims(value)
    if shape is None or len(shape) != 4:
        raise ModelError(f"the input {value.name!r} is {describe(value)}; {_EXPECTED_INPUT}")
    batch, a, b, c = shape
    if a == 3 and isinstance(b, int) and b > 0 and b == c:
        layout, size = "NCHW", b
    elif c == 3 and isinstance(a, int) and a > 0 and a == b:
        layout, size = "NHWC", a
    else:
        raise ModelError(f"the input {value.name!r} is {describe(value)}; {_EXPECTED_INPUT}")
    if isinstance(batch, int):
        raise ModelError(
            f"the input {value.name!r} is {describe(value)} with a fixed batch size of {batch}; "
            "export the model with a dynamic batch axis "
            "(e.g. dynamic_axes={'input': {0: 'N'}} in torch.onnx.export)"
        )
    return layout, size


def _check_output(value: onnx.ValueInfoProto) -> None:
    """Refuse a first output whose declared type or shape cannot be features."""
    tensor = value.type.tensor_type
    shape = dims(value)
    bad_type = not value.type.HasField("tensor_type") or tensor.elem_type not in (0, TensorProto.FLOAT)
    bad_rank = shape is not None and len(shape) not in (2, 4)
    bad_space = (
        shape is not None and len(shape) == 4 and any(isinstance(d, int) and d != 1 for d in shape[2:])
    )
    if bad_type or bad_rank or bad_space:
        raise ModelError(f"the first output {value.name!r} is {describe(value)}; {_EXPECTED_OUTPUT}")


def _preprocessing(model: onnx.ModelProto, size: int) -> Preprocessing:
    meta = contract.metadata(model)
    if contract.PREPROCESSING not in meta:
        return Preprocessing(size, DEFAULT_CENTRAL_FRACTION, IMAGENET_MEAN, IMAGENET_STD)
    try:
        prep = Preprocessing.from_json(meta[contract.PREPROCESSING])
    except DataError as exc:
        raise ModelError(f"metadata {contract.meta_key(contract.PREPROCESSING)}: {exc}") from exc
    if prep.size != size:
        raise ModelError(
            f"metadata {contract.meta_key(contract.PREPROCESSING)} says size {prep.size} but the model "
            f"input is {size} px"
        )
    return prep


def _probe(model: onnx.ModelProto, size: int, raw: str) -> int:
    """Run ``model`` on two black images; return the feature length D."""
    try:
        session = runtime.session(model.SerializeToString(), "the model", threads=1)
        features, out = session.run([FEATURES, raw], {IMAGE: np.zeros((2, size, size, 3), np.uint8)})
    except Exception as error:  # onnxruntime raises its own exception types
        exc = error.__cause__ if isinstance(error, ModelError) and error.__cause__ else error
        raise ModelError(
            f"onnxruntime cannot run the model on a batch of 2 {size}x{size} images: "
            f"{exc.__class__.__name__}: {exc}"
        ) from exc
    if out.dtype != np.float32 or not (out.ndim == 2 or (out.ndim == 4 and out.shape[2:] == (1, 1))):
        raise ModelError(
            f"the first output is {out.dtype} with shape {list(out.shape)} for 2 images; {_EXPECTED_OUTPUT}"
        )
    if out.shape[0] != 2 or features.shape[1] == 0:
        raise ModelError(f"the first output has shape {list(out.shape)} for a batch of 2; {_EXPECTED_OUTPUT}")
    return int(features.shape[1])


def adapt_user_model(data: bytes) -> tuple[onnx.ModelProto, Preprocessing, int]:
    """Check a user ONNX model against the contract and wrap it.

    Returns:
        ``(model, preprocessing, D)``: the model takes ``image`` uint8 ``[N, S, S, 3]`` and returns
        only ``features`` float32 ``[N, D]`` (the first output, flattened).

    Raises:
        ModelError: the bytes are not a valid ONNX model or it breaks the contract; the message says
            what was found and what is expected.
    """
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf and the checker raise several types
        raise ModelError(f"not a valid ONNX model: {exc.__class__.__name__}: {exc}") from exc
    graph = model.graph
    layout, size = _layout(image_input(graph))
    if not graph.output:
        raise ModelError(f"the model has no outputs; {_EXPECTED_OUTPUT}")
    first = graph.output[0]
    _check_output(first)
    prep = _preprocessing(model, size)
    used = tensor_names(graph)
    if FEATURES in used:
        rename_tensor(graph, FEATURES, fresh_name(f"{FEATURES}.core", used))
    raw = onnx.ValueInfoProto()
    raw.CopyFrom(first)
    graph.node.append(helper.make_node("Flatten", [first.name], [FEATURES], name=FEATURES, axis=1))
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", None]), raw])
    wrapped = attach_preprocessing(model, prep, layout)
    feature_size = _probe(wrapped, size, raw.name)
    del wrapped.graph.output[:]
    wrapped.graph.output.append(
        helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", feature_size])
    )
    return wrapped, prep, feature_size
