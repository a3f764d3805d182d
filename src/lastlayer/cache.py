"""The bottleneck cache: features kept in a handful of content-addressed Parquet files.

Layout under ``bottleneck_dir``::

    <model key>/part-<sha256 of the file>.parquet                  plain features
    <model key>/distorted-<distortion key>/part-<sha256>.parquet   distorted variants

A row is keyed by the SHA-256 of the image bytes (``content``) and a ``variant`` number (0 for plain
features); ``path`` and ``stamp`` (size and mtime as listed) let a warm run find an image's content
key without reading it. An image that cannot be decoded is cached too, with its ``error``, so it
is reported on every run but decoded once. Each file is named by the hash of its own bytes: a file
whose bytes do not match its name, or that does not parse, is reported, removed and its images are
computed again. Files are written atomically, one per ``flush_rows`` new rows or ``flush_seconds``
of work (whichever comes first, so a killed run keeps most of its work), never one per image
(the small-files problem on HDFS), and compacted when they grow numerous.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import posixpath
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lastlayer import storage

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^part-([0-9a-f]{64})\.parquet$")
#: More part files than this in one folder are merged into one at the end of a run.
COMPACT_ABOVE = 8
#: A part file is written per this many new rows, or per this many seconds of work.
FLUSH_ROWS = 4096
FLUSH_SECONDS = 60.0
#: Listings of a folder whose files another process removed while this one read them.
LOAD_ATTEMPTS = 3


#: What :meth:`FeatureStore._read_part` returns for a part another process removed meanwhile.
_VANISHED = pa.table({})


@dataclass(frozen=True)
class Row:
    """One cached result.

    Attributes:
        content: SHA-256 hex of the image bytes.
        variant: 0 for plain features, else the distorted variant number.
        path: the image's path relative to image_dir when it was computed.
        stamp: ``"<size>:<mtime>"`` when it was computed, or ``None``.
        feature: ``float32 [D]``, or ``None`` when the image could not be decoded.
        error: why the image could not be decoded, or ``None``.

    A row with neither feature nor error only records that ``path`` with ``stamp`` holds
    ``content`` (an image found in the cache under another path or mtime).
    """

    content: str
    variant: int
    path: str
    stamp: str | None
    feature: np.ndarray | None
    error: str | None


@dataclass(frozen=True)
class CachedKeys:
    """What a :class:`FeatureStore` holds, without the features: a picklable copy of its lookups, for
    engines that decide on other machines what to compute.

    Attributes:
        index: every cached ``(content, variant)``.
        errors: content key to decode error, for images that could not be decoded.
    """

    index: frozenset[tuple[str, int]]
    errors: Mapping[str, str]

    def has(self, content: str, variant: int = 0) -> bool:
        """Whether ``(content, variant)`` is cached (as features or as a decode error)."""
        return (content, variant) in self.index or content in self.errors

    def error(self, content: str) -> str | None:
        """Why this image could not be decoded, if that is what is cached."""
        return self.errors.get(content)

    def keys(self) -> CachedKeys:
        """Itself: it is already a copy."""
        return self


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("content", pa.string()),
            ("variant", pa.int32()),
            ("path", pa.string()),
            ("stamp", pa.string()),
            ("feature", pa.list_(pa.float32(), dim)),
            ("error", pa.string()),
        ]
    )


@dataclass
class FeatureStore:
    """The rows of one cache folder, loaded in memory, plus the rows added since loading.

    Attributes:
        url: the cache folder.
        dim: feature size D.
        features: ``float32 [M, D]`` of every row (zeros for failed images).
        damaged: number of part files found damaged and removed while loading.
    """

    url: str
    dim: int
    storage_options: Mapping[str, Any] | None = None
    flush_rows: int = field(default_factory=lambda: FLUSH_ROWS)
    flush_seconds: float = field(default_factory=lambda: FLUSH_SECONDS)
    features: np.ndarray = field(init=False)
    damaged: int = field(init=False, default=0)
    _index: dict[tuple[str, int], int] = field(init=False, default_factory=dict)
    _errors: dict[str, str] = field(init=False, default_factory=dict)
    _by_stamp: dict[tuple[str, str], str] = field(init=False, default_factory=dict)
    _pending: list[Row] = field(init=False, default_factory=list)
    _parts: list[str] = field(init=False, default_factory=list)
    _chunks: list[np.ndarray] = field(init=False, default_factory=list)
    _rows: int = field(init=False, default=0)
    _last_flush: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.features = np.zeros((0, self.dim), np.float32)
        self._load()

    # -- reading ---------------------------------------------------------------------------
    def _load(self) -> None:
        """Read every part file. Another process may compact the folder meanwhile (its merged file is
        written before the parts it replaces are removed): a part that vanished is skipped and the
        folder listed again, up to :data:`LOAD_ATTEMPTS` times, to read the merged file."""
        fs, root = storage.url_to_fs(self.url, self.storage_options)
        seen: set[str] = set()
        for _ in range(LOAD_ATTEMPTS):
            vanished = False
            for name in self._list(fs, root):
                if name in seen:
                    continue
                seen.add(name)
                digest = PART_RE.match(name).group(1)  # type: ignore[union-attr]
                table = self._read_part(fs, posixpath.join(root, name), digest)
                if table is _VANISHED:
                    vanished = True
                elif table is None:
                    self._remove_damaged(fs, root, name)
                else:
                    self._parts.append(name)
                    self._add_table(table)
            if not vanished:
                break
        self._consolidate()

    def _list(self, fs: Any, root: str) -> list[str]:
        """The part files of the folder, sorted."""
        try:
            names = fs.ls(root, detail=False) if fs.isdir(root) else []
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise storage.describe(exc, self.url, "list the bottleneck cache") from exc
        return sorted(n for n in (posixpath.basename(p) for p in names) if PART_RE.match(n))

    def _remove_damaged(self, fs: Any, root: str, name: str) -> None:
        self.damaged += 1
        log.warning(
            "damaged bottleneck cache file %s: ignored and removed; its images are computed again",
            storage.join(self.url, name),
        )
        try:
            fs.rm_file(posixpath.join(root, name))
        except Exception as exc:
            log.warning("could not remove %s: %s", posixpath.join(root, name), exc)

    def _read_part(self, fs: Any, path: str, digest: str) -> pa.Table | None:
        """The part's table; ``None`` when it is damaged; :data:`_VANISHED` when another process
        removed it since it was listed."""
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return _VANISHED
        except Exception as exc:
            raise storage.describe(exc, path, "read the bottleneck cache file") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            return None
        try:
            # one thread: Arrow's reader threads can outlive the interpreter and abort the process at
            # exit (apache/arrow#34314: 8 of 30 short runs of a cache writer died with SIGABRT)
            table = pq.read_table(io.BytesIO(data), use_threads=False, pre_buffer=False)
        except (pa.ArrowException, OSError):
            return None
        if not table.schema.equals(_schema(self.dim)):
            return None
        return table

    def _add_table(self, table: pa.Table) -> None:
        contents = table.column("content").to_pylist()
        variants = table.column("variant").to_pylist()
        paths = table.column("path").to_pylist()
        stamps = table.column("stamp").to_pylist()
        errors = table.column("error").to_pylist()
        feats = table.column("feature").combine_chunks()
        values = feats.values.to_numpy(zero_copy_only=False) if len(feats) else np.zeros(0, np.float32)
        matrix = np.asarray(values, np.float32).reshape(-1, self.dim)
        nulls = np.asarray(feats.is_null()) if feats.null_count else np.zeros(len(feats), bool)
        if feats.null_count:
            matrix = matrix.copy()
            matrix[nulls] = 0.0
        keep = []
        for i, (content, variant, path, stamp, error) in enumerate(
            zip(contents, variants, paths, stamps, errors, strict=True)
        ):
            if stamp is not None:
                self._by_stamp[(path, stamp)] = content
            if (content, variant) in self._index or (nulls[i] and error is None):
                continue
            self._index[(content, variant)] = self._rows + len(keep)
            if error is not None:
                self._errors[content] = error
            keep.append(i)
        if keep:
            self._chunks.append(matrix[keep])
            self._rows += len(keep)

    def _consolidate(self) -> None:
        if self._chunks:
            self.features = np.concatenate([self.features, *self._chunks])
            self._chunks = []

    # -- lookups ---------------------------------------------------------------------------
    def content_for(self, relpath: str, stamp: str | None) -> str | None:
        """The content key last seen at ``relpath`` with this size and mtime, if any."""
        return None if stamp is None else self._by_stamp.get((relpath, stamp))

    def has(self, content: str, variant: int = 0) -> bool:
        """Whether ``(content, variant)`` is cached (as features or as a decode error)."""
        return (content, variant) in self._index or content in self._errors

    def error(self, content: str) -> str | None:
        """Why this image could not be decoded, if that is what is cached."""
        return self._errors.get(content)

    def row(self, content: str, variant: int = 0) -> int:
        """Row of ``(content, variant)`` in :attr:`features` (call :meth:`flush` first for new rows)."""
        return self._index[(content, variant)]

    def __len__(self) -> int:
        return self._rows

    def keys(self) -> CachedKeys:
        """A picklable copy of what is cached now (see :class:`CachedKeys`)."""
        return CachedKeys(frozenset(self._index), dict(self._errors))

    # -- writing ---------------------------------------------------------------------------
    def add(self, rows: Iterable[Row]) -> None:
        """Add new rows; a part file is written when ``flush_rows`` rows are pending or
        ``flush_seconds`` have passed since the last one."""
        for row in rows:
            alias = row.feature is None and row.error is None
            if alias or (row.content, row.variant) in self._index:
                if alias and row.stamp is not None and self.content_for(row.path, row.stamp) != row.content:
                    self._pending.append(row)
                    self._by_stamp[(row.path, row.stamp)] = row.content
                continue
            self._pending.append(row)
            self._index[(row.content, row.variant)] = self._rows
            self._rows += 1
            self._chunks.append(
                np.zeros((1, self.dim), np.float32)
                if row.feature is None
                else row.feature.reshape(1, self.dim)
            )
            if row.error is not None:
                self._errors[row.content] = row.error
            if row.stamp is not None:
                self._by_stamp[(row.path, row.stamp)] = row.content
        if len(self._pending) >= self.flush_rows or (
            self._pending and time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write pending rows as one part file and make :attr:`features` cover every row."""
        self._consolidate()
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        name = self._write(self._pending)
        self._parts.append(name)
        self._pending = []

    def _write(self, rows: list[Row]) -> str:
        features = np.stack(
            [
                np.zeros(self.dim, np.float32) if r.feature is None else r.feature.astype(np.float32)
                for r in rows
            ]
        )
        mask = pa.array([r.feature is None for r in rows], pa.bool_())
        table = pa.table(
            {
                "content": [r.content for r in rows],
                "variant": pa.array([r.variant for r in rows], pa.int32()),
                "path": [r.path for r in rows],
                "stamp": [r.stamp for r in rows],
                "feature": pa.FixedSizeListArray.from_arrays(
                    pa.array(features.reshape(-1)), self.dim, mask=mask
                ),
                "error": [r.error for r in rows],
            },
            schema=_schema(self.dim),
        )
        return self._write_table(table)

    def _write_table(self, table: pa.Table) -> str:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="none")  # features do not compress; reads stay fast
        data = sink.getvalue()
        name = f"part-{hashlib.sha256(data).hexdigest()}.parquet"
        storage.write_atomic(storage.join(self.url, name), data, self.storage_options)
        log.debug("wrote %d cache rows to %s", table.num_rows, name)
        return name

    def compact(self) -> None:
        """Merge the part files into one when there are more than :data:`COMPACT_ABOVE`.

        The merged file is written before the old ones are removed, so a crash in between leaves
        duplicates (ignored when loading), never a loss.
        """
        self.flush()
        if len(self._parts) <= COMPACT_ABOVE:
            return
        fs, root = storage.url_to_fs(self.url, self.storage_options)
        merged_parts, tables = [], []
        for name in self._parts:
            table = self._read_part(fs, posixpath.join(root, name), PART_RE.match(name).group(1))  # type: ignore[union-attr]
            if table is not None and table is not _VANISHED:  # a vanished part was merged elsewhere
                merged_parts.append(name)
                tables.append(table)
        if len(tables) <= 1:
            self._parts = merged_parts
            return
        merged = self._write_table(pa.concat_tables(tables))
        for name in merged_parts:
            if name != merged:
                with contextlib.suppress(FileNotFoundError):  # another process merged and removed it
                    fs.rm_file(posixpath.join(root, name))
        log.info("compacted %d bottleneck cache files into one", len(merged_parts))
        self._parts = [merged]
