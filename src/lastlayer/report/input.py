"""What ``lastlayer report`` trusts of a run summary file: nothing it has not checked.

A summary file may come from anyone (a mail, a shared folder), so :func:`parse` refuses in one line
any that is not shaped as lastlayer writes it (nesting, numbers, types, class count) and drops
control characters from every string; :func:`thumbnail_url` reads images only from below the
image folder (and fetches nothing from the network unless asked); :func:`default_url` puts the
report beside the summary file, never where its content says; :func:`check_replaceable` refuses to
replace a file that is not a lastlayer report.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from lastlayer import storage
from lastlayer.errors import DataError

#: Deepest nesting of JSON values a summary has (the options of a run are 3 levels deep).
MAX_DEPTH = 16
#: Most classes a report is made for (its confusion matrix has this many squared cells).
MAX_CLASSES = 5000
#: Largest number (absolute) a summary holds: counts, seconds, seeds.
MAX_NUMBER = 2.0**63
#: Longest string kept (characters); longer ones are cut with "…".
MAX_STRING = 4096
#: The first bytes of a file the report may replace must hold this (the template's own line).
REPORT_MARK = b'<meta name="generator" content="lastlayer">'

# C0 and C1 controls (tab and newline included), and the bidirectional overrides and isolates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "labels": list,
    "image_counts": dict,
    "images": dict,
    "metrics": dict,
    "confusion_matrix": dict,
    "per_class": dict,
    "outputs": dict,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "skipped": list,
    "misclassified": list,
    "learning_curve": dict,
    "timings": dict,
    "cache": dict,
    "options": dict,
    "image_dir": str,
}


def _number(text: str) -> int | float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_NUMBER:
        raise ValueError(f"the number {text[:40]} is out of range")
    return int(text) if text.lstrip("-").isdigit() else value


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not a number a run summary holds")


def parse(data: bytes, url: str) -> dict[str, Any]:
    """The checked, cleaned summary in the JSON text ``data`` read from ``url``.

    Raises:
        DataError: not JSON, nested deeper than :data:`MAX_DEPTH`, a number out of range, a key of
            the wrong type, or more than :data:`MAX_CLASSES` classes.
    """
    try:
        summary = json.loads(data, parse_int=_number, parse_float=_number, parse_constant=_no_constant)
    except RecursionError:
        raise _malformed(url, "it is nested too deeply") from None
    except ValueError as exc:
        raise DataError(f"{url} is not JSON ({exc}): pass the .summary.json file of a run") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise DataError(
            f"{url} is not a run summary (no {', '.join(missing)}): pass the .summary.json file written "
            "by lastlayer retrain (a worker's shard result has no report)"
        )
    return checked(summary, url)


def checked(summary: Mapping[str, Any], url: str) -> dict[str, Any]:
    """``summary`` with control characters dropped from its strings, after checking its shape.

    Raises:
        DataError: see :func:`parse`.
    """
    clean = _clean(summary, url, 0)
    _check_types(clean, url)
    return clean


def _malformed(url: str, why: str) -> DataError:
    return DataError(f"{url} is not a run summary as lastlayer writes it: {why}; pass the unedited file")


def _clean(value: Any, url: str, depth: int) -> Any:
    """``value`` with control characters dropped from every string (keys included)."""
    if depth > MAX_DEPTH:
        raise _malformed(url, f"it is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        text = _CONTROL.sub("", value)
        return text if len(text) <= MAX_STRING else text[: MAX_STRING - 1] + "…"
    if isinstance(value, list):
        return [_clean(v, url, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {_clean(k, url, depth + 1): _clean(v, url, depth + 1) for k, v in value.items()}
    return value


def _check_types(summary: Mapping[str, Any], url: str) -> None:
    given = {k: t for k, t in _OPTIONAL.items() if summary.get(k) is not None}
    for key, kind in {**REQUIRED_KEYS, **given}.items():
        if not isinstance(summary[key], kind):
            raise _malformed(url, f"{key} is a {type(summary[key]).__name__}")
    labels = summary["labels"]
    if len(labels) > MAX_CLASSES:
        raise _malformed(url, f"{len(labels):,} classes, more than a report shows ({MAX_CLASSES:,})")
    if not all(isinstance(label, str) for label in labels):
        raise _malformed(url, "a label is not a string")
    matrix = summary["confusion_matrix"].get("matrix")
    n = len(labels)
    if not (
        isinstance(matrix, list)
        and len(matrix) == n
        and all(isinstance(row, list) and len(row) == n for row in matrix)
        and all(isinstance(v, int) and v >= 0 for row in matrix for v in row)
    ):
        raise _malformed(url, f"confusion_matrix.matrix is not {n} x {n} counts")
    for key in ("image_counts", "per_class"):
        if not all(isinstance(v, dict) for v in summary[key].values()):
            raise _malformed(url, f"an entry of {key} is not an object")
    for key in ("skipped", "misclassified"):
        if not all(isinstance(v, dict) for v in summary.get(key) or []):
            raise _malformed(url, f"an entry of {key} is not an object")


# -- where the report goes and what it reads ----------------------------------------------------
def default_url(summary_url: str) -> str:
    """The report beside its summary file: ``<stem>.report.html`` for ``<stem>.summary.json``."""
    stem = summary_url.removesuffix(".json").removesuffix(".summary")
    return stem + ".report.html"


def check_replaceable(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse to replace ``url`` unless it is missing or a lastlayer report.

    Raises:
        DataError: it is a file of something else (or not a regular file).
        StorageError: it cannot be looked at.
    """
    if not storage.exists(url, storage_options):
        return
    fs, path = storage.url_to_fs(url, storage_options)
    head = storage.read_head(fs, path, url, 4096)
    if REPORT_MARK not in head:
        raise DataError(
            f"{url} exists and is not a lastlayer report: refusing to replace it; pass "
            "--output=ANOTHER_PATH (or remove the file yourself)"
        )


def thumbnail_url(image_dir: str, path: str, report_url: str, fetch_images: bool) -> str:
    """The URL of the image ``path`` below ``image_dir``, for the report written to ``report_url``.

    Raises:
        DataError: ``path`` is absolute or leaves the folder (``..``); ``image_dir`` is no folder, or
            is on another filesystem than the report and the local one while ``fetch_images`` is off.
    """
    if not fetch_images and _filesystem(image_dir) not in (("", ""), _filesystem(report_url)):
        raise DataError(
            f"{image_dir} is not on this machine or the report's filesystem: pass --fetch_images to "
            "read thumbnails from it"
        )
    bare = image_dir.split("://", 1)[-1].rstrip("/")
    if not bare or bare in (".", ".."):
        raise DataError(f"image_dir {image_dir!r} is no image folder")
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise DataError(f"{path!r} is not a path below the image folder")
    url = storage.join(image_dir, path)
    if not storage.inside(url, image_dir):
        raise DataError(f"{path!r} is a link out of the image folder")
    return url


def _filesystem(url: str) -> tuple[str, str]:
    """``(scheme, host)`` of ``url``; ``("", "")`` for a local path."""
    if "::" in url:
        return ("chained", url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() in ("file", "local"):
        return ("", "")
    return (scheme.lower(), rest.split("/", 1)[0])
