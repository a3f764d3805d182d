"""Labelling images with a retrained model: the top-k labels, as label_image.py prints them.

The model's metadata carries its labels and preprocessing, so images are prepared exactly as in
training; a model with a "none of the above" score (:data:`lastlayer.contract.UNKNOWN`) also says
which images are none of its classes, and still gives their scores.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from lastlayer import storage
from lastlayer.engines.base import available_cores
from lastlayer.errors import DataError, ModelError, StorageError
from lastlayer.model import check, contract, runtime
from lastlayer.preprocess import MAX_IMAGE_BYTES, Preprocessing, decode

#: The logger name its lines always had (``lastlayer.inference``), whatever the module's name.
log = logging.getLogger("lastlayer.inference")

BATCH = 32
#: Largest labels file read, bytes.
MAX_LABELS_BYTES = 64 << 20

#: One image made ready for a model: one ``uint8 [S, S, 3]`` array per image input.
Prepared = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Prediction:
    """The labels of one image, best first, or why it could not be read.

    Attributes:
        image: the image's URL.
        top: ``(label, probability)`` pairs, highest probability first.
        error: why the image was skipped, or ``None``.
        unknown: the model's word for "none of its classes" when the image is that, else ``None``.
        ood_score: its distance to the classes (``None`` for a model without one).
        multi_label: ``top`` is a multi-label model's set: every label at or above its threshold.
    """

    image: str
    top: tuple[tuple[str, float], ...]
    error: str | None = None
    unknown: str | None = None
    ood_score: float | None = None
    multi_label: bool = False

    @property
    def answer(self) -> str | list[str] | None:
        """The unknown word, the best label, or a multi-label model's set of labels."""
        if self.multi_label:
            return [label for label, _ in self.top]
        return self.unknown or (self.top[0][0] if self.top else None)


@dataclass(frozen=True)
class Answer:
    """What a model says of one image.

    Attributes:
        probabilities: ``float32 [C]``.
        ood_score: its distance to the classes, ``None`` for a model without one.
        unknown: the model's word for "none of its classes" when the score is above its threshold.
    """

    probabilities: np.ndarray
    ood_score: float | None = None
    unknown: str | None = None


def read_labels(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """A labels file: one label a line; blank lines at the end are ignored.

    Raises:
        DataError: not a regular UTF-8 text file of at most :data:`MAX_LABELS_BYTES`.
    """
    data = storage.read_bytes(url, storage_options, MAX_LABELS_BYTES, "the labels file")
    try:
        return tuple(data.decode("utf-8").rstrip("\n").split("\n"))
    except UnicodeDecodeError:
        raise DataError(
            f"{url} is not a UTF-8 text file: pass the labels file written with the model"
        ) from None


@dataclass(frozen=True)
class RetrainedModel:
    """A retrained model loaded for inference: its metadata, labels and one onnxruntime session.

    Attributes:
        source: where it was read from.
        info: what its metadata says (preprocessing, architecture, output name).
        labels: class names in output order (the model's, or a labels file's).
        output: the output read by :meth:`probabilities`.
    """

    source: str
    info: contract.ModelInfo
    labels: tuple[str, ...]
    output: str
    session: ort.InferenceSession = field(repr=False)

    @classmethod
    def load(
        cls,
        graph: str,
        *,
        labels: str = "",
        threads: int = 0,
        output_layer: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        spin: bool = True,
    ) -> RetrainedModel:
        """Read the model at ``graph`` (any URL).

        Args:
            labels: a labels file to use instead of the labels stored in the model.
            threads: onnxruntime threads (0: one per core).
            spin: whether its idle threads spin-wait for the next run (see :func:`runtime.session`).
            output_layer: the output to read (default: the model's final tensor).

        Raises:
            ModelError: the model cannot be read, was not made by lastlayer, does not agree with its
                own metadata or does not run (see :mod:`lastlayer.model.check`); the labels file
                does not match it.
        """
        data = storage.read_bytes(graph, storage_options, what="the model")
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:  # onnx raises DecodeError and others for foreign bytes
            raise ModelError(
                f"{graph} is not an ONNX model ({exc.__class__.__name__}): pass the --output_graph "
                "of lastlayer retrain"
            ) from exc
        info = check.read_info(proto, graph)
        names = read_labels(labels, storage_options) if labels else info.labels
        if len(names) != len(info.labels):
            raise ModelError(
                f"{labels} has {len(names)} labels but {graph} has {len(info.labels)} classes: "
                "pass the labels file written with this model"
            )
        session = runtime.session(data, graph, threads or available_cores(), spin=spin)
        output = output_layer or info.output_name
        if output not in {o.name for o in session.get_outputs()}:
            raise ModelError(
                f"{graph} has no output {output!r}; it has {[o.name for o in session.get_outputs()]}"
            )
        check.check_graph(info, names, session, output, graph)
        model = cls(graph, info, names, output, session)
        blank = tuple(np.zeros((prep.size, prep.size, 3), np.uint8) for _, prep in info.inputs)
        check.check_run(model.probabilities([blank]), names, graph)
        return model

    def prepare(self, data: bytes) -> Prepared:
        """An image's bytes as the model's inputs: one ``uint8 [S, S, 3]`` per image input, each
        decoded with its own network's preprocessing, as in training.

        Raises:
            DataError: the bytes are not an image this package can decode.
        """
        done: dict[Preprocessing, np.ndarray] = {}
        for _, prep in self.info.inputs:
            if prep not in done:
                done[prep] = decode(data, prep)
        return tuple(done[prep] for _, prep in self.info.inputs)

    def outputs(self, inputs: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray | None]:
        """``float32 [N, C]`` class probabilities of prepared images (see :meth:`prepare`), and their
        ``float32 [N]`` distances to the classes (``None`` for a model without that output).

        Raises:
            ModelError: the model gives NaN or infinite scores (its training diverged).
        """
        feed = {name: np.stack([x[i] for x in inputs]) for i, (name, _) in enumerate(self.info.inputs)}
        unknown = self.info.unknown
        names = [self.output] + ([unknown.output] if unknown else [])
        try:
            probs, *ood = self.session.run(names, feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(
                f"{self.source} fails to run: {' '.join(str(exc).split())[:300]}; re-export the model "
                "or check that this machine has the memory it asks for"
            ) from None
        if not np.isfinite(probs).all():
            raise ModelError(
                f"{self.source} gives scores that are not numbers (NaN or infinite): its training "
                "diverged; retrain it with a smaller --learning_rate"
            )
        return probs, (ood[0] if ood else None)

    def probabilities(self, inputs: Sequence[Prepared]) -> np.ndarray:
        """``float32 [N, C]`` class probabilities of prepared images (see :meth:`outputs`)."""
        return self.outputs(inputs)[0]

    def answers(self, inputs: Sequence[Prepared]) -> list[Answer]:
        """What the model says of each prepared image (see :meth:`outputs`)."""
        probs, ood = self.outputs(inputs)
        if ood is None or self.info.unknown is None:
            return [Answer(p) for p in probs]
        threshold, word = self.info.unknown.threshold, self.info.unknown.label
        return [Answer(p, float(d), word if d > threshold else None) for p, d in zip(probs, ood, strict=True)]

    def top(self, probs: np.ndarray, k: int) -> tuple[tuple[str, float], ...]:
        """The ``k`` most probable ``(label, probability)`` of one row of :meth:`probabilities`."""
        best = np.argsort(-probs, kind="stable")[:k]
        return tuple((self.labels[j], float(probs[j])) for j in best)

    def chosen(self, probs: np.ndarray, k: int) -> tuple[tuple[str, float], ...]:
        """:meth:`top`, or for a multi-label model every ``(label, probability)`` at or above the
        label's threshold, most probable first."""
        if self.info.thresholds is None:
            return self.top(probs, k)
        over = np.flatnonzero(probs >= np.asarray(self.info.thresholds, np.float32))
        return tuple((self.labels[j], float(probs[j])) for j in over[np.argsort(-probs[over], kind="stable")])


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
    """Label each image with the model at ``graph``, :data:`BATCH` images per network call.

    Args:
        labels: a labels file to use instead of the labels stored in the model.
        output_layer: the output to read (default: the model's final tensor).

    Raises:
        ModelError: the model cannot be read or was not made by lastlayer; the labels file
            does not match it.
    """
    model = RetrainedModel.load(
        graph, labels=labels, threads=threads, output_layer=output_layer, storage_options=storage_options
    )
    results: dict[int, Prediction] = {}
    ready: list[tuple[int, Prepared]] = []

    def run() -> None:
        if ready:
            answers = model.answers([x for _, x in ready])
            for (i, _), a in zip(ready, answers, strict=True):
                results[i] = Prediction(
                    images[i],
                    model.chosen(a.probabilities, top_k),
                    None,
                    a.unknown,
                    a.ood_score,
                    model.info.thresholds is not None,
                )
            ready.clear()

    for i, url in enumerate(images):
        try:
            data = storage.read_bytes(url, storage_options, MAX_IMAGE_BYTES, "the image")
            ready.append((i, model.prepare(data)))
        except (DataError, StorageError) as exc:
            log.warning("Skipped %s: %s", url, exc)
            results[i] = Prediction(url, (), str(exc))
        if len(ready) >= BATCH:
            run()
    run()
    return [results[i] for i in range(len(images))]
