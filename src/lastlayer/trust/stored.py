"""The trust stage's findings as one memo entry (:mod:`lastlayer.trust.memo`): an ``.npz`` of the arrays
(the calibrated classifier, the "none of the above" distance) with the summary entry as JSON in it,
read back without pickle."""

from __future__ import annotations

import dataclasses
import io
import json
import types
import typing
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import numpy as np

from lastlayer.model import contract
from lastlayer.training.train import Classifier, Standardizer
from lastlayer.trust import ood
from lastlayer.trust.summary import Trust

T = TypeVar("T")
_ARRAYS = ("mean", "scale", "centres", "directions")


def encode(classifier: Classifier, unknown: ood.ExportedDistance | None, trust: Trust) -> bytes:
    """The bytes of an entry."""
    arrays = {"weights": classifier.weights, "biases": classifier.biases}
    head: dict[str, Any] = {"trust": dataclasses.asdict(trust), "unknown": None}
    if unknown is not None:
        d = unknown.distance
        arrays |= dict(
            zip(_ARRAYS, (d.standardizer.mean, d.standardizer.scale, d.centres, d.directions), strict=True)
        )
        head["unknown"] = {"shrinkage": d.shrinkage, "meta": dataclasses.asdict(unknown.meta)}
    buf = io.BytesIO()
    np.savez(buf, head=np.array(json.dumps(head)), **arrays)
    return buf.getvalue()


def decode(data: bytes) -> tuple[Classifier, ood.ExportedDistance | None, Trust]:
    """What :func:`encode` wrote.

    Raises:
        ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile: not an entry as
            :func:`encode` writes it (or damaged: each array's CRC is checked).
    """
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        head = json.loads(str(npz["head"]))
        classifier = Classifier(npz["weights"], npz["biases"])
        unknown = None
        if head["unknown"] is not None:
            mean, scale, centres, directions = (npz[name] for name in _ARRAYS)
            distance = ood.Distance(
                Standardizer(mean, scale), centres, directions, head["unknown"]["shrinkage"]
            )
            unknown = ood.ExportedDistance(distance, contract.Unknown(**head["unknown"]["meta"]))
    return classifier, unknown, typed(Trust, head["trust"])


def typed(kind: type[T], value: Any) -> T:
    """``value`` (JSON data of :func:`dataclasses.asdict`) as an instance of the dataclass ``kind``,
    nested dataclasses, lists and optional fields included."""
    return _build(kind, value)


def _build(kind: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (a for a in get_args(kind) if a is not type(None))
        return _build(inner, value)
    if origin is list:
        (item,) = get_args(kind)
        return [_build(item, v) for v in value]
    if dataclasses.is_dataclass(kind):
        hints = get_type_hints(kind)
        return kind(**{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)})
    return value
