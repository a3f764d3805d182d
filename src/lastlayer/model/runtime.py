"""Where networks run: the one onnxruntime session factory (CPU or CUDA), the GPU probe and what a
``--device`` value means here."""

from __future__ import annotations

import functools
import logging
import warnings

import onnxruntime as ort

from lastlayer.errors import ModelError, UsageError
from lastlayer.settings.run import AUTO, CPU, CUDA, DEVICES

#: The logger name its lines always had (``lastlayer.contract``).
log = logging.getLogger("lastlayer.contract")

__all__ = ["AUTO", "CPU", "CUDA", "DEVICES", "gpu_problem", "resolve_device", "session"]

_CPU_PROVIDER, _CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
_NO_CUDA_BUILD = (
    "the installed onnxruntime is its CPU-only build, without the CUDA execution provider; "
    "pip install 'lastlayer[gpu]' installs the GPU build (see the README)"
)


@functools.cache
def gpu_problem() -> str | None:
    """Why onnxruntime cannot run a network on a GPU here, or ``None`` when it can (found by starting
    a session of a one-node model on the CUDA provider; asked once per process)."""
    from onnx import TensorProto, helper  # here: onnx takes ~0.7 s to import, which Spark's workers skip

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


def session(
    onnx_bytes: bytes, what: str, threads: int = 0, device: str = CPU, spin: bool = True
) -> ort.InferenceSession:
    """An onnxruntime session on ``onnx_bytes``: ``threads`` intra-op threads (0: onnxruntime's
    default), one inter-op thread, sequential execution; on ``device``, :data:`CPU` or :data:`CUDA`
    (onnxruntime's CUDA execution provider on GPU 0 of those visible, the CPU for any operator
    it lacks).

    Args:
        what: how messages name the model (an architecture or a URL).
        spin: whether idle intra-op threads spin-wait for the next run (onnxruntime's default); off
            where other threads need the cores between runs (a server's image decoders).

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
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
