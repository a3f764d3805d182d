"""Labelling images with a retrained model: the top-k labels, as label_image.py prints them.

The model's metadata carries its labels and preprocessing, so images are prepared exactly as in
training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from lastlayer import contract, storage
from lastlayer.engines.base import available_cores
from lastlayer.errors import DataError, ModelError, StorageError
from lastlayer.preprocess import decode

log = logging.getLogger(__name__)

BATCH = 32


@dataclass(frozen=True)
class Prediction:
    """The labels of one image, best first, or why it could not be read.

    Attributes:
        image: the image's URL.
        top: ``(label, probability)`` pairs, highest probability first.
        error: why the image was skipped, or ``None``.
    """

    image: str
    top: tuple[tuple[str, float], ...]
    error: str | None = None


def read_labels(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """A labels file: one label a line; blank lines at the end are ignored."""
    return tuple(storage.read_bytes(url, storage_options).decode("utf-8").rstrip("\n").split("\n"))


def label(
    graph: str,
    images: Sequence[str],
    *,
    labels: str = "",
    top_k: int = 5,
    threads: int = 0,
    output_layer: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Prediction]:
    """Label each image with the model at ``graph``.

    Args:
        labels: a labels file to use instead of the labels stored in the model.
        output_layer: the output to read (default: the model's final tensor).

    Raises:
        ModelError: the model cannot be read or was not made by lastlayer; the labels file
            does not match it.
    """
    data = storage.read_bytes(graph, storage_options)
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and others for foreign bytes
        raise ModelError(
            f"{graph} is not an ONNX model ({exc.__class__.__name__}): pass the --output_graph "
            "of lastlayer retrain"
        ) from exc
    info = contract.read_info(proto, graph)
    names = read_labels(labels, storage_options) if labels else info.labels
    if len(names) != len(info.labels):
        raise ModelError(
            f"{labels} has {len(names)} labels but {graph} has {len(info.labels)} classes: "
            "pass the labels file written with this model"
        )
    session = contract.session(data, graph, threads or available_cores())
    output = output_layer or info.output_name
    if output not in {o.name for o in session.get_outputs()}:
        raise ModelError(
            f"{graph} has no output {output!r}; it has {[o.name for o in session.get_outputs()]}"
        )

    results: dict[int, Prediction] = {}
    ready: list[tuple[int, np.ndarray]] = []

    def run() -> None:
        if not ready:
            return
        (probs,) = session.run([output], {contract.IMAGE: np.stack([x for _, x in ready])})
        for (i, _), p in zip(ready, probs, strict=True):
            best = np.argsort(-p, kind="stable")[:top_k]
            results[i] = Prediction(images[i], tuple((names[j], float(p[j])) for j in best))
        ready.clear()

    for i, url in enumerate(images):
        try:
            ready.append((i, decode(storage.read_bytes(url, storage_options), info.preprocessing)))
        except (DataError, StorageError) as exc:
            log.warning("Skipped %s: %s", url, exc)
            results[i] = Prediction(url, (), str(exc))
        if len(ready) >= BATCH:
            run()
    run()
    return [results[i] for i in range(len(images))]
