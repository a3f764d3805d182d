"""The model contract: the tensor names and metadata every lastlayer ONNX model carries.

A feature model (zoo network or user model, see :mod:`lastlayer.zoo`) takes :data:`IMAGE`: uint8 RGB
``[N, S, S, 3]`` and returns :data:`FEATURES`: float32 ``[N, D]`` (zoo networks also
:data:`LOGITS`: float32 ``[N, 1000]``). A retrained model (:mod:`lastlayer.model.export`) takes the same
:data:`IMAGE` and returns ``<final_tensor_name>``: float32 ``[N, C]`` class probabilities; a model
retrained on several networks takes one such input per network (:func:`input_name`), each prepared
with that network's preprocessing (the :data:`INPUTS` metadata). Both carry
``lastlayer.*`` metadata (``metadata_props``): :func:`meta_key` names them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lastlayer.errors import ModelError
from lastlayer.preprocess import Preprocessing

if TYPE_CHECKING:  # (onnx takes ~0.7 s to import: Spark's Python workers only need the names below)
    import onnx

IMAGE = "image"
FEATURES = "features"
LOGITS = "logits"
META_PREFIX = "lastlayer."

# metadata keys, without META_PREFIX
LABELS = "labels"
PREPROCESSING = "preprocessing"
INPUTS = "inputs"
ARCHITECTURE = "architecture"
FINAL_TENSOR_NAME = "final_tensor_name"
VERSION = "version"
MODEL_KEY = "model_key"
SEED = "seed"
KEY = "key"
BUILDER_VERSION = "builder_version"
GRAPH_SHA256 = "graph_sha256"
UNKNOWN = "unknown"
#: ``--multi_label`` models: JSON list of per-label thresholds (the output is per-label sigmoids).
THRESHOLDS = "thresholds"


def meta_key(name: str) -> str:
    """The ``metadata_props`` key of ``name`` (``lastlayer.<name>``)."""
    return META_PREFIX + name


def input_name(branch: int, branches: int) -> str:
    """The image input of branch ``branch`` of ``branches``: :data:`IMAGE` alone, else ``image_<i>``."""
    return IMAGE if branches == 1 else f"{IMAGE}_{branch}"


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    """The model's ``lastlayer.*`` metadata, keys without the prefix."""
    return {
        p.key.removeprefix(META_PREFIX): p.value
        for p in proto.metadata_props
        if p.key.startswith(META_PREFIX)
    }


@dataclass(frozen=True)
class Unknown:
    """The :data:`UNKNOWN` metadata of a model with a "none of the above" score (JSON).

    Attributes:
        output: the name of its ``float32 [N]`` score output.
        threshold: above it, an image is none of the classes.
        label: what to say then (``"unknown"`` by default).
    """

    output: str
    threshold: float
    label: str


@dataclass(frozen=True)
class ModelInfo:
    """What a retrained model's metadata says about it.

    Attributes:
        labels: class names in output order.
        preprocessing: how images become the (first) image input.
        architecture: the feature network(s) it was trained on.
        output_name: the name of its probabilities output.
        inputs: ``(input name, preprocessing)`` of each image input, in order.
        unknown: its "none of the above" score, or ``None``.
        thresholds: a multi-label model's per-label thresholds (its output: per-label
            probabilities, each label answered at or above its threshold), else ``None``.
    """

    labels: tuple[str, ...]
    preprocessing: Preprocessing
    architecture: str
    output_name: str
    inputs: tuple[tuple[str, Preprocessing], ...] = ()
    unknown: Unknown | None = None
    thresholds: tuple[float, ...] | None = None


def _inputs(
    meta: dict[str, str], preprocessing: Preprocessing, source: str
) -> tuple[tuple[str, Preprocessing], ...]:
    """The :data:`INPUTS` metadata, or the one :data:`IMAGE` input of models written without it."""
    if INPUTS not in meta:
        return ((IMAGE, preprocessing),)
    try:
        return tuple(
            (str(entry["name"]), Preprocessing.from_json(str(entry["preprocessing"])))
            for entry in json.loads(meta[INPUTS])
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{source}: invalid {meta_key(INPUTS)} metadata: {exc}") from exc


def read_info(proto: onnx.ModelProto, source: str) -> ModelInfo:
    """Read the metadata :func:`lastlayer.model.export.build_classifier` writes.

    Raises:
        ModelError: the model was not written by lastlayer, or its metadata is broken.
    """
    meta = metadata(proto)
    missing = [k for k in (LABELS, PREPROCESSING) if k not in meta]
    if missing:
        raise ModelError(
            f"{source} has no {', '.join(meta_key(k) for k in missing)} metadata: "
            "it was not written by lastlayer retrain; retrain to get a model that carries its preprocessing"
        )
    try:
        labels = tuple(json.loads(meta[LABELS]))
    except ValueError as exc:
        raise ModelError(f"{source}: invalid {meta_key(LABELS)} metadata: {exc}") from exc
    preprocessing = Preprocessing.from_json(meta[PREPROCESSING])
    return ModelInfo(
        labels=labels,
        preprocessing=preprocessing,
        architecture=meta.get(ARCHITECTURE, "unknown"),
        output_name=meta.get(FINAL_TENSOR_NAME, proto.graph.output[0].name),
        inputs=_inputs(meta, preprocessing, source),
        unknown=_unknown(meta, source),
        thresholds=_thresholds(meta, source),
    )


def _thresholds(meta: dict[str, str], source: str) -> tuple[float, ...] | None:
    """The :data:`THRESHOLDS` metadata, or ``None`` for a single-label model."""
    if THRESHOLDS not in meta:
        return None
    try:
        values = json.loads(meta[THRESHOLDS])
    except (ValueError, RecursionError):
        values = None
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in values
    ):
        raise ModelError(
            f"{source}: {meta_key(THRESHOLDS)} metadata must be a JSON list of numbers in [0, 1]; "
            "re-export the model"
        )
    return tuple(float(v) for v in values)


def _unknown(meta: dict[str, str], source: str) -> Unknown | None:
    """The :data:`UNKNOWN` metadata, or ``None`` for a model without it."""
    if UNKNOWN not in meta:
        return None
    try:
        entry = json.loads(meta[UNKNOWN])
        return Unknown(str(entry["output"]), float(entry["threshold"]), str(entry["label"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{source}: invalid {meta_key(UNKNOWN)} metadata: {exc}") from exc
