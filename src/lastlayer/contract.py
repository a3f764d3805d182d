"""The model contract: the tensor names and metadata every lastlayer ONNX model carries, and the one
onnxruntime session factory.

A feature model (zoo network or user model, see :mod:`lastlayer.zoo`) takes :data:`IMAGE`: uint8 RGB
``[N, S, S, 3]`` and returns :data:`FEATURES`: float32 ``[N, D]`` (zoo networks also
:data:`LOGITS`: float32 ``[N, 1000]``). A retrained model (:mod:`lastlayer.export`) takes the same
:data:`IMAGE` and returns ``<final_tensor_name>``: float32 ``[N, C]`` class probabilities; a model
retrained on several networks takes one such input per network (:func:`input_name`), each prepared
with that network's preprocessing (the :data:`INPUTS` metadata). Both carry
``lastlayer.*`` metadata (``metadata_props``): :func:`meta_key` names them.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from dataclasses import dataclass

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lastlayer.errors import ModelError, UsageError
from lastlayer.preprocess import Preprocessing

log = logging.getLogger(__name__)

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


# -- devices ------------------------------------------------------------------------------------
#: Where networks run: the ``--device`` values.
CPU, CUDA, AUTO = "cpu", "cuda", "auto"
DEVICES = (CPU, CUDA, AUTO)
_CPU_PROVIDER, _CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
_NO_CUDA_BUILD = (
    "the installed onnxruntime is its CPU-only build, without the CUDA execution provider; "
    "pip install 'lastlayer[gpu]' installs the GPU build (see the README)"
)


@functools.cache
def gpu_problem() -> str | None:
    """Why onnxruntime cannot run a network on a GPU here, or ``None`` when it can (found by starting
    a session of a one-node model on the CUDA provider; asked once per process)."""
    if _CUDA_PROVIDER not in ort.get_available_providers():
        return _NO_CUDA_BUILD
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    probe = helper.make_model(
        helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "probe", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        with warnings.catch_warnings():  # onnxruntime warns when it falls back: the answer says so
            warnings.simplefilter("ignore")
            started = ort.InferenceSession(
                probe.SerializeToString(), options, providers=[_CUDA_PROVIDER, _CPU_PROVIDER]
            ).get_providers()
    except Exception as exc:  # onnxruntime raises its own exception types
        return f"onnxruntime's CUDA provider did not start: {' '.join(str(exc).split())[:300]}"
    if started[0] != _CUDA_PROVIDER:
        return (
            "onnxruntime's CUDA provider did not start: no NVIDIA GPU visible, or its CUDA and cuDNN "
            "libraries are missing (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
    return None


def resolve_device(device: str) -> str:
    """The device a ``--device`` value means here: :data:`CPU` or :data:`CUDA`; :data:`AUTO` is
    CUDA when a GPU answers, else the CPU, with a log line saying why.

    Raises:
        UsageError: an unknown value, or :data:`CUDA` where onnxruntime cannot use a GPU.
    """
    if device not in DEVICES:
        raise UsageError(f"--device={device!r}: must be one of {', '.join(DEVICES)}")
    if device == CPU:
        return CPU
    problem = gpu_problem()
    if problem is None:
        return CUDA
    if device == CUDA:
        raise UsageError(f"--device=cuda: {problem}; or use --device=cpu or auto")
    log.info("--device=auto: the network runs on the CPU: %s", problem)
    return CPU


def session(onnx_bytes: bytes, what: str, threads: int = 0, device: str = CPU) -> ort.InferenceSession:
    """An onnxruntime session on ``onnx_bytes``: ``threads`` intra-op threads (0: onnxruntime's
    default), one inter-op thread, sequential execution; on ``device``, :data:`CPU` or :data:`CUDA`
    (onnxruntime's CUDA execution provider on GPU 0 of those visible, the CPU for any operator
    it lacks).

    Args:
        what: how messages name the model (an architecture or a URL).

    Raises:
        UsageError: negative ``threads``, another ``device``, or :data:`CUDA` where onnxruntime
            cannot use a GPU (see :func:`gpu_problem`).
        ModelError: onnxruntime cannot load the model, or puts it on the CPU after all.
    """
    if threads < 0:
        raise UsageError(f"threads must be 0 (default) or positive, not {threads}")
    if device not in (CPU, CUDA):
        raise UsageError(f"device must be {CPU} or {CUDA}, not {device!r}")
    if device == CUDA and (problem := gpu_problem()):
        raise UsageError(f"--device=cuda: {problem}; or use --device=cpu or auto")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # TF32 would round the convolutions' inputs to 10 bits of mantissa: features would differ from the CPU's
    cuda = (_CUDA_PROVIDER, {"device_id": "0", "use_tf32": "0"})
    providers = [_CPU_PROVIDER] if device == CPU else [cuda, _CPU_PROVIDER]
    try:
        loaded = ort.InferenceSession(onnx_bytes, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load {what}: {exc}") from exc
    if device == CUDA and loaded.get_providers()[0] != _CUDA_PROVIDER:  # onnxruntime fell back to the CPU
        raise ModelError(f"onnxruntime put {what} on the CPU, not the GPU: its CUDA provider did not start")
    return loaded


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
    """

    labels: tuple[str, ...]
    preprocessing: Preprocessing
    architecture: str
    output_name: str
    inputs: tuple[tuple[str, Preprocessing], ...] = ()
    unknown: Unknown | None = None


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
    """Read the metadata :func:`lastlayer.export.build_classifier` writes.

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
    )


def _unknown(meta: dict[str, str], source: str) -> Unknown | None:
    """The :data:`UNKNOWN` metadata, or ``None`` for a model without it."""
    if UNKNOWN not in meta:
        return None
    try:
        entry = json.loads(meta[UNKNOWN])
        return Unknown(str(entry["output"]), float(entry["threshold"]), str(entry["label"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{source}: invalid {meta_key(UNKNOWN)} metadata: {exc}") from exc
