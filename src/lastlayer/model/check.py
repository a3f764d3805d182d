"""A retrained model checked before it is used (``label``, ``serve``, :class:`RetrainedModel`).

A model file may have been edited or built by hand: its ``lastlayer.*`` metadata must have the types
:mod:`lastlayer.model.export` writes, its preprocessing sizes and fractions must be in range and agree with
the graph's image inputs, its labels must match the width of its output, and the graph must run on
one image. Anything else is a one-line :class:`ModelError` at load, never a traceback, a silent
wrong answer, or an error that blames an image later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from lastlayer.errors import DataError, ModelError
from lastlayer.model import contract
from lastlayer.preprocess import Preprocessing

#: Largest side of a network's square image input, px.
MAX_INPUT_SIZE = 4096
#: Most classes a model may have.
MAX_CLASSES = 1_000_000


def read_info(proto: onnx.ModelProto, source: str) -> contract.ModelInfo:
    """:func:`lastlayer.model.contract.read_info` after checking the metadata's types and ranges.

    Raises:
        ModelError: the metadata is missing, of the wrong type or out of range.
    """
    meta = contract.metadata(proto)
    if contract.LABELS in meta:
        _check_labels(meta[contract.LABELS], source)
    try:
        info = contract.read_info(proto, source)
    except DataError as exc:  # Preprocessing.from_json's error would blame an image later
        raise ModelError(
            f"{source}: invalid {contract.meta_key(contract.PREPROCESSING)} metadata: {exc}"
        ) from None
    for name, prep in ((contract.IMAGE, info.preprocessing), *info.inputs):
        _check_preprocessing(prep, name, source)
    if info.thresholds is not None and len(info.thresholds) != len(info.labels):
        raise ModelError(
            f"{source}: {contract.meta_key(contract.THRESHOLDS)} metadata has {len(info.thresholds)} "
            f"thresholds for {len(info.labels)} labels; re-export the model"
        )
    return info


def _check_labels(text: str, source: str) -> None:
    key = contract.meta_key(contract.LABELS)
    try:
        labels = json.loads(text)
    except (ValueError, RecursionError):
        raise ModelError(f"{source}: {key} metadata is not JSON; re-export the model") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ModelError(f"{source}: {key} metadata must be a JSON list of strings; re-export the model")
    if not 1 <= len(labels) <= MAX_CLASSES:
        raise ModelError(
            f"{source}: {key} metadata has {len(labels):,} labels; a model has 1 to {MAX_CLASSES:,}"
        )


def _check_preprocessing(prep: Preprocessing, name: str, source: str) -> None:
    where = f"{source}: the preprocessing of input {name!r}"
    if not 1 <= prep.size <= MAX_INPUT_SIZE:
        raise ModelError(f"{where} has size {prep.size}; it must be in [1, {MAX_INPUT_SIZE}] px")
    if not 0 < prep.central_fraction <= 1:
        raise ModelError(f"{where} has central_fraction {prep.central_fraction}; it must be in (0, 1]")
    values = (*prep.mean, *prep.std)
    if not all(math.isfinite(v) for v in values) or min(prep.std) <= 0:
        raise ModelError(f"{where} has mean {prep.mean} and std {prep.std}: finite, std above 0")


def check_graph(
    info: contract.ModelInfo, labels: Sequence[str], session: ort.InferenceSession, output: str, source: str
) -> None:
    """Check that the graph's image inputs are the metadata's, shaped ``uint8 [N, S, S, 3]`` with
    each input's preprocessing size, and that ``output`` is ``[N, len(labels)]`` where it says.

    Raises:
        ModelError: they disagree.
    """
    graph_inputs = {i.name: i for i in session.get_inputs()}
    names = [name for name, _ in info.inputs]
    if sorted(graph_inputs) != sorted(names):
        raise ModelError(
            f"{source}: its graph takes {sorted(graph_inputs)} but its metadata names {names}; re-export it"
        )
    for name, prep in info.inputs:
        spec = graph_inputs[name]
        shape = list(spec.shape)
        expected = [prep.size, prep.size, 3]
        if (
            spec.type != "tensor(uint8)"
            or len(shape) != 4
            or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True))
        ):
            raise ModelError(
                f"{source}: input {name!r} is {spec.type} {shape}, but its preprocessing says uint8 "
                f"[N, {prep.size}, {prep.size}, 3]; re-export the model"
            )
    (spec,) = [o for o in session.get_outputs() if o.name == output] or [None]
    width = spec.shape[-1] if spec is not None and spec.shape else None
    if isinstance(width, int) and width != len(labels):
        raise ModelError(
            f"{source}: it has {len(labels)} labels but its output {output!r} gives {width} scores; "
            "use the labels written with this model"
        )


def check_run(probabilities: np.ndarray, labels: Sequence[str], source: str) -> None:
    """Check the ``[1, C]`` probabilities of one image against the labels.

    Raises:
        ModelError: the output is not one row of ``len(labels)`` scores.
    """
    shape: Any = getattr(probabilities, "shape", None)
    if shape is None or tuple(shape) != (1, len(labels)):
        raise ModelError(
            f"{source}: one image gives scores of shape {shape}, not [1, {len(labels)}] for its "
            f"{len(labels)} labels; re-export the model or pass its own labels"
        )
