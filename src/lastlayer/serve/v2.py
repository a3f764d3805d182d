"""The KServe v2 request's parts, checked: every malformed part is a :class:`Problem` (a JSON 4xx),
never an exception of the server's own."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lastlayer.model import contract
    from lastlayer.model.inference import RetrainedModel

#: The v2 output saying which images are none of the model's classes.
UNKNOWN_OUTPUT = "unknown"


class Problem(Exception):
    """A request the server refuses: HTTP ``status`` with ``message`` (JSON ``{"error": ...}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body; 400 when it is not JSON or is nested too deeply to parse."""
    try:
        return json.loads(body)
    except RecursionError:
        raise Problem(400, "the request is nested too deeply: send a KServe v2 inference request") from None
    except ValueError as exc:
        raise Problem(400, f"the request is not JSON ({exc}): send a KServe v2 inference request") from None


def image_count(payload: Any, max_queue: int) -> int:
    """How many images a v2 request holds (its first input's first dimension), checked."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise Problem(400, 'a v2 inference request is a JSON object with an "inputs" list')
    first = payload["inputs"][0] if payload["inputs"] else None
    if not isinstance(first, dict):
        raise Problem(400, 'send the input(s) as objects in "inputs"')
    check_shape(first.get("shape"), max_queue)
    return first["shape"][0]


def top_k(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) < 1:
        raise Problem(400, f"top_k={text[:20]!r}: must be a whole number from 1 to 999999999")
    return int(text)


def unknown_outputs(unknown: contract.Unknown | None) -> list[dict[str, Any]]:
    """The v2 outputs of a model's "none of the above" score: the score and whether it is above
    the threshold (none for a model without one)."""
    if unknown is None:
        return []
    return [
        {"name": unknown.output, "datatype": "FP32", "shape": [-1]},
        {"name": UNKNOWN_OUTPUT, "datatype": "BOOL", "shape": [-1]},
    ]


def output_names(model: RetrainedModel) -> list[str]:
    return [model.output, *(o["name"] for o in unknown_outputs(model.info.unknown))]


def asked_outputs(outputs: Any) -> list[Any] | None:
    """The output names a v2 request asks for, ``None`` for all."""
    if outputs is None:
        return None
    return (
        [o.get("name") if isinstance(o, dict) else o for o in outputs]
        if isinstance(outputs, list)
        else [outputs]
    )


def check_outputs(outputs: Any, names: list[str]) -> None:
    asked = asked_outputs(outputs)
    if asked is None:
        return
    missing = [o for o in asked if o not in names]
    if missing:
        raise Problem(400, f"no output {missing[0]!r}; this model has {', '.join(map(repr, names))}")


def encoded_images(tensor: Mapping[str, Any], shape: list[int]) -> list[bytes]:
    data = tensor.get("data")
    if len(shape) != 1 or not isinstance(data, list) or len(data) != shape[0]:
        raise Problem(400, "BYTES input: shape [N] and N base64 strings, one image file each")
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except (binascii.Error, TypeError, ValueError) as exc:
        raise Problem(400, f"BYTES input: an element is not base64 ({exc})") from None


def check_shape(shape: Any, max_queue: int) -> None:
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Problem(400, f"shape {str(shape)[:100]} is not a list of sizes")
    if shape[0] < 1:
        raise Problem(400, "the request holds no image: send at least one")
    if shape[0] > max_queue:
        raise Problem(400, f"{shape[0]} images in one request, more than --max_queue={max_queue}")


def check_name(tensor: Mapping[str, Any], name: str) -> None:
    if tensor.get("name") != name:
        raise Problem(400, f'the input is named {tensor.get("name")!r}; this model takes "{name}"')


def pixels(tensor: Mapping[str, Any], shape: list[int], size: int) -> np.ndarray:
    """``uint8 [N, S, S, 3]`` of a UINT8 input."""
    if shape[1:] != [size, size, 3]:
        raise Problem(400, f"UINT8 input: shape {shape} must be [N, {size}, {size}, 3] for this model")
    try:
        values = np.asarray(tensor.get("data")).ravel()  # no dtype: 1.7 or "12" must not pass as 1 or 12
    except (TypeError, ValueError, OverflowError):
        values = np.zeros(0, np.float64)
    if values.dtype.kind not in "iu" and values.size:
        raise Problem(400, "UINT8 input: data must be a (flat or nested) list of whole numbers in [0, 255]")
    if values.size != int(np.prod(shape)):
        raise Problem(
            400, f"UINT8 input: {values.size} values for shape {shape} ({int(np.prod(shape))} expected)"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise Problem(400, "UINT8 input: values must be in [0, 255]")
    return values.astype(np.uint8).reshape(shape)
