"""The rows of a labels file (CSV with a header, or JSON lines), read a line at a time.

Columns: ``path`` and ``label`` or ``labels`` (several: ``;``-separated, or a JSON list in JSON lines;
the first is the image's ``label``), ``split`` and ``group`` (optional); others are ignored.
Rows come back as Arrow columns gathered :data:`~lastlayer.dataset.CHUNK` rows at a time, so a file of
millions of rows holds no Python object per row. Written with the standard ``csv`` and ``json``
modules rather than ``pyarrow.csv`` because every bad row is reported by its line number.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from lastlayer import storage
from lastlayer.dataset import CHUNK, SPLITS, label_for
from lastlayer.errors import DataError

#: Largest labels file read (bytes): about 40 million rows of 100 bytes.
MAX_LABELS_BYTES = 4 << 30
#: Longest line of a labels file (characters).
MAX_LINE_CHARS = 65536
#: Bad rows shown in a message (the rest are counted).
SHOWN = 5
COLUMNS = ("path", "label", "split", "group", "labels")
#: Separates the labels of a CSV ``labels`` value (and of :attr:`Rows.labels`).
SEPARATOR = ";"


@dataclass
class BadRows:
    """Rows that cannot be used: the :data:`SHOWN` with the smallest line numbers as ``(line, why)``,
    and how many in all."""

    shown: list[tuple[int, str]] = field(default_factory=list)
    count: int = 0

    def add(self, line: int, why: str) -> None:
        """Count a bad row (and keep it while it is among the :data:`SHOWN` first lines)."""
        self.count += 1
        self.shown = sorted([*self.shown, (line, why)])[:SHOWN]

    def text(self) -> str:
        """``N bad rows (line 3: ...; line 9: ...; and 4 more)``."""
        more = f"; and {self.count - len(self.shown)} more" if self.count > len(self.shown) else ""
        shown = "; ".join(f"line {line}: {why}" for line, why in self.shown)
        return f"{self.count} bad row{'s' * (self.count != 1)} ({shown}{more})"


@dataclass(frozen=True)
class Rows:
    """The usable rows of a labels file, as columns.

    Attributes:
        line: ``int64 [N]`` each row's line number in the file (1 = the first line).
        path: ``large_string [N]`` the path as written.
        label: ``large_string [N]`` the label (:func:`~lastlayer.dataset.label_for` of the value).
        split: ``int8 [N]`` index into :data:`~lastlayer.dataset.SPLITS`, -1 where none is given.
        group: ``large_string [N]`` the group, null where none is given.
        labels: ``large_string [N]`` all its labels, normalized, :data:`SEPARATOR`-joined (the
            ``label`` alone where no ``labels`` value is given).
    """

    line: np.ndarray
    path: pa.Array
    label: pa.Array
    split: np.ndarray
    group: pa.Array
    labels: pa.Array


class _Columns:
    """Rows gathered into Python lists, moved into Arrow arrays every :data:`CHUNK` rows."""

    def __init__(self) -> None:
        self.lists: dict[str, list[Any]] = {name: [] for name in ("line", *COLUMNS)}
        self.arrays: dict[str, list[Any]] = {name: [] for name in self.lists}
        self.appends = [values.append for values in self.lists.values()]

    def add(self, line: int, path: str, label: str, split: int, group: str | None, labels: str) -> None:
        for append, value in zip(self.appends, (line, path, label, split, group, labels), strict=True):
            append(value)
        if len(self.lists["line"]) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        for name, values in self.lists.items():
            kind = {"line": np.int64, "split": np.int8}.get(name)
            self.arrays[name].append(np.array(values, kind) if kind else pa.array(values, pa.large_string()))
            values.clear()

    def rows(self) -> Rows:
        self.flush()
        a = self.arrays
        return Rows(
            np.concatenate(a["line"]),
            pa.concat_arrays(a["path"]),
            pa.concat_arrays(a["label"]),
            np.concatenate(a["split"]),
            pa.concat_arrays(a["group"]),
            pa.concat_arrays(a["labels"]),
        )


def read_rows(url: str, storage_options: storage.StorageOptions | None) -> tuple[Rows, BadRows]:
    """The usable rows of the labels file ``url`` and the bad ones (bad values only: whether the
    images exist is checked later).

    Raises:
        DataError: not a regular file, too large, not UTF-8, a line over :data:`MAX_LINE_CHARS`, or
            no ``path`` or ``label`` column.
        StorageError: it cannot be read.
    """
    columns, bad = _Columns(), BadRows()
    with storage.open_regular(url, storage_options, MAX_LABELS_BYTES, "the labels file") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        try:
            lines = _lines(text, url)
            first = next(lines, "")
            records = (
                _json_records(first, lines)
                if first.lstrip().startswith("{")
                else _csv_records(first, lines, url)
            )
            for line, record in records:
                _add(columns, bad, line, record)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{url}: the labels file is not UTF-8 text ({exc.reason}); save it as UTF-8"
            ) from exc
    return columns.rows(), bad


def _lines(text: io.TextIOWrapper, url: str) -> Iterator[str]:
    number = 0
    while line := text.readline(MAX_LINE_CHARS + 1):
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise DataError(
                f"{url}: line {number} of the labels file is longer than {MAX_LINE_CHARS:,} characters; "
                "is it a labels file (CSV with a header, or JSON lines)?"
            )
        yield line


def _csv_records(header_line: str, lines: Iterator[str], url: str) -> Iterator[tuple[int, Any]]:
    """``(line, {column: value})`` per CSV record (the header on line 1), or ``(line, why)``."""
    header = [name.strip().lower() for name in next(csv.reader([header_line]), [])]
    missing = [name for name in ("path", "label") if name not in header]
    if "labels" in header and missing == ["label"]:
        missing = []
    if missing:
        raise DataError(
            f"{url}: the labels file's header {header_line.strip()[:200]!r} has no {' or '.join(missing)} "
            f"column; its first line names the columns: path,label[,split][,group]"
        )
    reader = csv.reader(lines)
    while True:
        begins = reader.line_num + 2  # the line this record begins on
        try:
            values = next(reader, None)
        except csv.Error as exc:  # a quoted field left open runs past the field size limit
            raise DataError(
                f"{url}: the record that begins on line {begins} of the labels file is not CSV ({exc}); "
                "close its quotes"
            ) from exc
        if values is None:
            return
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield begins, f"{len(values)} fields where the header names {len(header)}"
            continue
        yield begins, dict(zip(header, values, strict=True))


def _json_records(first: str, lines: Iterator[str]) -> Iterator[tuple[int, Any]]:
    """``(line, object)`` per JSON line (``(line, why)`` for one that is not a JSON object)."""
    for line, text in enumerate(_chain(first, lines), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):  # nesting deeper than Python's stack is not JSON we take
            yield line, "not JSON"
            continue
        yield line, record if isinstance(record, dict) else "not a JSON object"


def _chain(first: str, lines: Iterator[str]) -> Iterator[str]:
    yield first
    yield from lines


#: :func:`label_for` remembered for the few distinct labels a file has (at most 65,536 kept).
_label = functools.lru_cache(maxsize=1 << 16)(label_for)


def _add(columns: _Columns, bad: BadRows, line: int, record: Any) -> None:
    """Add one record to ``columns``, or its problem to ``bad``."""
    if isinstance(record, str):
        bad.add(line, record)
        return
    values = {name: record.get(name) for name in COLUMNS}
    many = values.pop("labels")
    wrong = [name for name, v in values.items() if v is not None and not isinstance(v, str | int)]
    if wrong:
        bad.add(line, f"{wrong[0]} is not a string")
        return
    names = _labels(many)
    if names is None:
        bad.add(line, "labels is not a list of strings or a ';'-separated string")
        return
    path = str(values["path"] or "").strip()
    label = _label(str(values["label"] or "")) or (names[0] if names else "")
    names = list(dict.fromkeys([label, *names])) if label else names
    split = str(values["split"] or "").strip().lower()
    group = str(values["group"]).strip() if values["group"] not in (None, "") else None
    if not path:
        bad.add(line, "no path")
    elif not label:
        bad.add(line, f"no label (got {values['label']!r})")
    elif split and split not in SPLITS:
        bad.add(line, f"unknown split {split!r} (training, validation or testing, or empty)")
    else:
        columns.add(
            line, path, label, SPLITS.index(split) if split else -1, group or None, SEPARATOR.join(names)
        )


def _labels(value: Any) -> list[str] | None:
    """The normalized labels of a ``labels`` value (a ``;``-separated string or a list of strings),
    empty ones dropped; ``None`` for a value of another type."""
    if value is None:
        return []
    if isinstance(value, str | int):
        value = str(value).split(SEPARATOR)
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        return None
    return [name for v in value if (name := _label(str(v)))]
