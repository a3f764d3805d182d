"""The bottleneck cache: features kept in a handful of content-addressed Parquet files.

Layout under ``bottleneck_dir``::

    <model key>/part-<sha256 of the file>.v2.parquet                 plain features
    <model key>/distorted-<distortion key>/part-<sha256>.v2.parquet  distorted variants
    <folder>/_staging/<run>/part-<sha256>.v2.parquet                 written by Spark tasks, uncommitted

A row is keyed by the SHA-256 of the image bytes (``content``) and a ``variant`` number (0 for plain
features); ``path`` and ``stamp`` (size and mtime as listed) let a warm run find an image's content
key without reading it. An image that cannot be decoded is cached too, with its ``error``, so it
is reported on every run but decoded once. Files are written atomically, one per ``flush_rows`` new
rows or ``flush_seconds`` of work (whichever comes first, so a killed run keeps most of its work),
never one per image (the small-files problem on HDFS), and small ones are merged when they grow
numerous.

**No feature matrix in memory.** A store loads only the keys of its files (every column but
``feature``; ``has_feature`` says which rows have one), so its memory does not grow with the feature
size; an image's features are found by their *location*, the part's number in the store and the row
in it packed in an int64 (:func:`pack`), and read a part at a time by a :class:`FeatureSource`.

**Damage.** Each file is named by the SHA-256 of its own bytes, and its pages carry CRC checksums. A
small file (up to :data:`WHOLE_READ_BYTES`) is read whole when its keys are loaded and checked against
its name; of a larger one only the key columns are read, their pages checked, and the whole file is
checked against its name when its features are first streamed (:meth:`FeatureSource.read`). A file
found damaged either way is reported and removed, and its images are computed again.

**Formats.** Files written since the feature matrix left memory are ``part-<sha256>.v2.parquet``
with the ``has_feature`` column and page checksums; the older ``part-<sha256>.parquet`` files (no
``has_feature``) are still read (whole, when their keys are loaded) and merged into new ones when
compacted. Versions before this one ignore ``.v2`` files instead of taking them for damaged ones.

Engines that compute on other machines write there: each task writes its rows as part files into
a staging folder of its run (:func:`stage_part`), and the driver moves the files of the one
successful attempt of each task into place and removes the staging folder with whatever failed or
speculative attempts left in it (:func:`commit`), so a retried task never adds a row twice.

In memory a store keeps no Python object per row: its keys are sorted arrays of 16-byte digests
(:func:`key_digests`) with their locations, its stamps 16-byte digests of path and stamp
(:func:`stamp_digests`) next to 32-byte content keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import posixpath
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lastlayer import storage
from lastlayer.bottlenecks.keys import (
    CONTENT,
    CachedKeys,
    ContentKeys,
    DigestMap,
    content_bytes,
    errors_among,
    fold_keys,
    key_digest,
    key_digests,
    stamp_digest,
    stamp_digests,
)
from lastlayer.bottlenecks.parts import (
    KEY_COLUMNS,
    PART_RE,
    FeatureSource,
    Row,
    encode_rows,
    encode_table,
    pack,
    parse,
    part_schema,
    remove_damaged,
    unpack,
)
from lastlayer.errors import DataError

#: The logger name its lines always had (``lastlayer.cache``), whatever the module's name.
log = logging.getLogger("lastlayer.cache")

#: More *small* part files (fewer rows than :data:`SMALL_PART_ROWS`) than this in one folder are
#: merged into files of about :data:`FLUSH_ROWS` rows at the end of a run. Larger parts (a Spark
#: task's, of about a thousand rows, 5 MB of features) are left alone: merging them would only read
#: them all through the driver.
COMPACT_ABOVE = 8
#: A part file is written per this many new rows, or per this many seconds of work.
FLUSH_ROWS = 4096
SMALL_PART_ROWS = FLUSH_ROWS // 8
FLUSH_SECONDS = 60.0
#: Listings of a folder whose files another process removed while this one read them.
LOAD_ATTEMPTS = 3
#: A part file up to this size is read whole (one request, and its hash checked) when its keys are
#: loaded; of a larger one only the key columns are read.
WHOLE_READ_BYTES = 1 << 20

#: What :meth:`FeatureStore._read_part` returns for a part another process removed meanwhile.
_VANISHED = pa.table({})


# -- the store ---------------------------------------------------------------------------------
@dataclass
class FeatureStore:
    """The keys of one cache folder's rows, loaded in memory, plus the rows added since loading; the
    features stay in the files (:meth:`source` reads them).

    Attributes:
        url: the cache folder.
        dim: feature size D.
        damaged: number of part files found damaged and removed while loading.
    """

    url: str
    dim: int
    storage_options: Mapping[str, Any] | None = None
    flush_rows: int = field(default_factory=lambda: FLUSH_ROWS)
    flush_seconds: float = field(default_factory=lambda: FLUSH_SECONDS)
    damaged: int = field(init=False, default=0)
    _keys: DigestMap = field(init=False, default_factory=lambda: DigestMap(16, np.int64, first=True))
    _stamps: DigestMap = field(init=False, default_factory=lambda: DigestMap(16, CONTENT, first=False))
    _errors: dict[str, str] = field(init=False, default_factory=dict)
    _pending: list[Row] = field(init=False, default_factory=list)
    #: each part's file name by its number in locations (a merged part keeps its number)
    _names: list[str] = field(init=False, default_factory=list)
    #: the rows of each part file in the folder
    _parts: dict[str, int] = field(init=False, default_factory=dict)
    _count: int = field(init=False, default=0)
    _last_flush: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.refresh()

    # -- reading ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Load the keys of the part files this store has not read yet (all of them at first; later
        those that Spark tasks or other processes wrote meanwhile), after writing its pending rows.
        Another process may compact the folder meanwhile (its merged file is written before the parts
        it replaces are removed): a part that vanished is skipped and the folder listed again, up to
        :data:`LOAD_ATTEMPTS` times."""
        self.flush()
        fs, root = storage.url_to_fs(self.url, self.storage_options)
        seen: set[str] = set(self._names)
        for _ in range(LOAD_ATTEMPTS):
            vanished = False
            for name, size in self._list(fs, root):
                if name in seen:
                    continue
                seen.add(name)
                table = self._key_table(fs, posixpath.join(root, name), size)
                if table is _VANISHED:
                    vanished = True
                elif table is None or not self._add_keys(table, name):
                    self.damaged += 1
                    remove_damaged(storage.join(self.url, name), self.storage_options)
            if not vanished:
                break

    def _list(self, fs: Any, root: str) -> list[tuple[str, int | None]]:
        """The part files of the folder and their sizes, sorted."""
        try:
            entries = fs.ls(root, detail=True) if fs.isdir(root) else []
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise storage.describe(exc, self.url, "list the bottleneck cache") from exc
        named = ((posixpath.basename(e["name"]), e.get("size")) for e in entries)
        return sorted((n, size) for n, size in named if PART_RE.match(n))

    def _read_part(self, fs: Any, path: str) -> pa.Table | None:
        """The part's whole table (current format) after checking its bytes against its name; ``None``
        when it is damaged; :data:`_VANISHED` when another process removed it since it was listed."""
        try:
            data = storage.read_regular(fs, path, path, storage.MAX_READ_BYTES, "the bottleneck cache file")
        except FileNotFoundError:
            return _VANISHED
        except DataError:  # a FIFO, a device, a link to one, or too large
            return None
        except Exception as exc:
            raise storage.describe(exc, path, "read the bottleneck cache file") from exc
        if hashlib.sha256(data).hexdigest() != PART_RE.match(posixpath.basename(path)).group(1):  # type: ignore[union-attr]
            return None
        return parse(data, self.dim)

    def _whole_keys(self, fs: Any, path: str) -> pa.Table | None:
        """The part's :data:`KEY_COLUMNS`, the file read whole and checked (as :meth:`_read_part`)."""
        table = self._read_part(fs, path)
        return table if table is None or table is _VANISHED else table.select(list(KEY_COLUMNS))

    def _key_table(self, fs: Any, path: str, size: int | None) -> pa.Table | None:
        """The part's :data:`KEY_COLUMNS` (as :meth:`_read_part` says what it found): a small or
        legacy file read whole, else the footer and the key columns' byte ranges alone."""
        if size is None or size <= WHOLE_READ_BYTES:
            return self._whole_keys(fs, path)
        buffer = bytearray(size)  # only the ranges read are touched (and resident)
        tail = max(0, size - 65536)
        try:
            self._fetch(fs, path, buffer, [(tail, size)])
            footer = size - 8 - int.from_bytes(buffer[-8:-4], "little")
            if footer < tail and not self._fetch(fs, path, buffer, [(footer, tail)]):
                return None
            metadata = pq.ParquetFile(io.BytesIO(buffer)).metadata
            if "has_feature" not in metadata.schema.to_arrow_schema().names:
                return self._whole_keys(fs, path)
            if not self._fetch(fs, path, buffer, _column_ranges(metadata, KEY_COLUMNS)):
                return None
        except FileNotFoundError:
            return _VANISHED
        except (pa.ArrowException, OSError, ValueError):
            return None
        return parse(buffer, self.dim, KEY_COLUMNS)

    def _fetch(self, fs: Any, path: str, buffer: bytearray, ranges: list[tuple[int, int]]) -> bool:
        """Read the byte ranges of ``path`` into ``buffer``; ``False`` for a range outside the file (a
        damaged footer).

        Raises:
            FileNotFoundError: the file is gone.
        """
        for start, end in ranges:
            if not 0 <= start < end <= len(buffer):
                return False
            try:
                buffer[start:end] = fs.cat_file(path, start=start, end=end)
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise storage.describe(exc, path, "read the bottleneck cache file") from exc
        return True

    def _add_keys(self, table: pa.Table, name: str) -> bool:
        """Add the keys of part file ``name`` (the first row of each key wins); ``False`` if its keys
        are not content keys (a damaged or foreign file), which adds nothing."""
        contents = table.column("content").to_pylist()
        try:
            digests = key_digests(contents, table.column("variant").to_numpy())
        except ValueError:
            return False
        number = len(self._names)
        self._names.append(name)
        self._parts[name] = table.num_rows
        errors = table.column("error").to_pylist()
        has_error = np.array([e is not None for e in errors], bool)
        has_feature = table.column("has_feature").fill_null(False).to_numpy(zero_copy_only=False)
        self._add_stamps(table, contents)
        keep = _first_of_each_key(digests, has_feature | has_error)
        keep = keep[~self._keys.get_many(digests[keep])[1]]
        self._keys.put_many(digests[keep], pack(number, keep))
        for i in keep[has_error[keep]]:
            self._errors[contents[i]] = errors[i]
        self._count += len(keep)
        return True

    def _add_stamps(self, table: pa.Table, contents: list[str]) -> None:
        stamps = table.column("stamp").to_pylist()
        paths = table.column("path").to_pylist()
        with_stamp = [i for i, s in enumerate(stamps) if s is not None]
        if with_stamp:
            self._stamps.put_many(
                stamp_digests([paths[i] for i in with_stamp], [stamps[i] for i in with_stamp]),
                content_bytes([contents[i] for i in with_stamp]).view(CONTENT).reshape(-1),
            )

    # -- lookups ---------------------------------------------------------------------------
    def content_for(self, relpath: str, stamp: str | None) -> str | None:
        """The content key last seen at ``relpath`` with this size and mtime, if any."""
        if stamp is None:
            return None
        found = self._stamps.get(stamp_digest(relpath, stamp))
        return None if found is None else bytes(found).hex()  # bytes of an np.void or of bytes

    def has(self, content: str, variant: int = 0) -> bool:
        """Whether ``(content, variant)`` is cached (as features or as a decode error)."""
        return content in self._errors or self._keys.get(key_digest(content, variant)) is not None

    def has_many(self, contents: np.ndarray, variant: int = 0) -> np.ndarray:
        """:meth:`has` of each of the ``V32 [n]`` content keys: ``bool [n]``."""
        return self._keys.get_many(fold_keys(contents, variant))[1] | errors_among(contents, self._errors)

    def contents_for_many(self, paths: pa.Array, stamps: pa.Array) -> ContentKeys:
        """:meth:`content_for` of each path and stamp (Arrow string arrays of one length)."""
        keys = np.zeros(len(paths), CONTENT)
        known = np.zeros(len(paths), bool)
        for start in range(0, len(paths), 65536):
            rel = paths.slice(start, 65536).to_pylist()
            marks = stamps.slice(start, 65536).to_pylist()
            stamped = np.array([m is not None for m in marks], bool)
            digests = stamp_digests(
                [r for r, m in zip(rel, marks, strict=True) if m is not None],
                [m for m in marks if m is not None],
            )
            found_keys, found = self._stamps.get_many(digests)
            at = start + np.flatnonzero(stamped)
            keys[at[found]] = found_keys[found]
            known[at[found]] = True
        return ContentKeys(keys, known)

    def error(self, content: str) -> str | None:
        """Why this image could not be decoded, if that is what is cached."""
        return self._errors.get(content)

    def failed_many(self, contents: np.ndarray) -> np.ndarray:
        """``bool [n]``: which of the ``V32 [n]`` content keys have a cached decode error."""
        return errors_among(contents, self._errors)

    def location(self, content: str, variant: int = 0) -> int:
        """Where the features of ``(content, variant)`` are (see :func:`pack`; a pending row's
        location holds once :meth:`flush` has written it).

        Raises:
            KeyError: the key is not cached.
        """
        found = self._keys.get(key_digest(content, variant))
        if found is None:
            raise KeyError((content, variant))
        return int(found)

    def locations(self, contents: np.ndarray, variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`location` of each of the ``V32 [n]`` content keys (meaningless where missing), and
        ``bool [n]`` where each is cached."""
        return self._keys.get_many(fold_keys(contents, variant))

    def source(self) -> FeatureSource:
        """Where this store's features are, after writing its pending rows."""
        self.flush()
        return FeatureSource(self.url, self.dim, tuple(self._names), self.storage_options)

    def __len__(self) -> int:
        return self._count

    def keys(self) -> CachedKeys:
        """A picklable copy of what is cached now (see :class:`CachedKeys`)."""
        return CachedKeys(self._keys.merged()[0].copy(), dict(self._errors))

    # -- writing ---------------------------------------------------------------------------
    def add(self, rows: Iterable[Row]) -> None:
        """Add new rows; a part file is written when ``flush_rows`` rows are pending or
        ``flush_seconds`` have passed since the last one."""
        for row in rows:
            digest = key_digest(row.content, row.variant)
            alias = row.feature is None and row.error is None
            if alias or self._keys.get(digest) is not None:
                if alias and row.stamp is not None and self.content_for(row.path, row.stamp) != row.content:
                    self._pending.append(row)
                    self._put_stamp(row)
                continue
            # the pending rows become the next part, in this order (refresh and compact flush first)
            self._keys.put(digest, int(pack(len(self._names), len(self._pending))))
            self._pending.append(row)
            self._count += 1
            if row.error is not None:
                self._errors[row.content] = row.error
            if row.stamp is not None:
                self._put_stamp(row)
        if len(self._pending) >= self.flush_rows or (
            self._pending and time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def _put_stamp(self, row: Row) -> None:
        assert row.stamp is not None
        self._stamps.put(stamp_digest(row.path, row.stamp), bytes.fromhex(row.content))

    def flush(self) -> None:
        """Write the pending rows as one part file."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        name, data = encode_rows(self._pending, self.dim)
        self._write(name, data)
        self._names.append(name)
        self._parts[name] = len(self._pending)
        self._pending = []

    def _write(self, name: str, data: bytes) -> None:
        storage.write_atomic(storage.join(self.url, name), data, self.storage_options)
        log.debug("wrote %s", name)

    def compact(self) -> None:
        """When more than :data:`COMPACT_ABOVE` part files hold fewer than :data:`SMALL_PART_ROWS`
        rows each, merge those into files of about :data:`FLUSH_ROWS` rows, dropping repeated keys.

        A merged file is written before the files it replaces are removed, so a crash in between
        leaves duplicates (ignored when loading), never a loss.
        """
        self.flush()
        small = [name for name, rows in self._parts.items() if rows < SMALL_PART_ROWS]
        if len(small) <= COMPACT_ABOVE:
            return
        fs, root = storage.url_to_fs(self.url, self.storage_options)
        groups: list[list[tuple[str, pa.Table]]] = [[]]
        for name in small:
            table = self._read_part(fs, posixpath.join(root, name))
            if table is None or table is _VANISHED:  # a vanished part was merged elsewhere
                del self._parts[name]
                continue
            if sum(t.num_rows for _, t in groups[-1]) >= FLUSH_ROWS:
                groups.append([])
            groups[-1].append((name, table))
        merged = [self._merge_group(fs, root, group) for group in groups if len(group) > 1]
        count = "one" if len(merged) == 1 else str(len(merged))
        log.info("compacted %d bottleneck cache files into %s", sum(merged), count)

    def _merge_group(self, fs: Any, root: str, group: list[tuple[str, pa.Table]]) -> int:
        """Write the tables of ``group`` as one file (path records, and the first row of each key),
        point the keys that were in them at it, then remove their files; the number of files merged."""
        table = pa.concat_tables(_one_precision([t for _, t in group], self.dim))
        digests = key_digests(table.column("content").to_pylist(), table.column("variant").to_numpy())
        has_feature = table.column("has_feature").fill_null(False).to_numpy(zero_copy_only=False)
        record = ~has_feature & np.asarray(table.column("error").is_null())
        keep = np.union1d(np.flatnonzero(record), _first_of_each_key(digests, ~record))
        if len(keep) < table.num_rows:
            table = table.take(keep)
        name, data = encode_table(table)
        self._write(name, data)
        old = {n for n, _ in group}
        numbers = [i for i, n in enumerate(self._names) if n in old]
        self._names.append(name)
        self._parts[name] = table.num_rows
        keyed = np.flatnonzero(~record[keep])
        now, found = self._keys.get_many(digests[keep][keyed])
        moved = found & np.isin(unpack(now)[0], numbers)
        self._keys.set_many(digests[keep][keyed][moved], pack(len(self._names) - 1, keyed[moved]))
        for name_old in old - {name}:
            del self._parts[name_old]
            with contextlib.suppress(FileNotFoundError):  # another process merged and removed it
                fs.rm_file(posixpath.join(root, name_old))
        return len(group)


def _one_precision(tables: list[pa.Table], dim: int) -> list[pa.Table]:
    """``tables`` in one schema: float16 when any has float16 features (a folder of activations
    holds float32 parts of decode errors alone), else as they are."""
    half = part_schema(dim, half=True)
    if not any(t.schema == half for t in tables):
        return tables
    return [t.cast(half) for t in tables]


def _column_ranges(metadata: pq.FileMetaData, columns: Sequence[str]) -> list[tuple[int, int]]:
    """The byte ranges of ``columns``' chunks in a Parquet file, adjacent ones joined."""
    spans = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] in columns:
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                spans.append((start, start + chunk.total_compressed_size))
    joined: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(end, joined[-1][1]))
        else:
            joined.append((start, end))
    return joined


def _first_of_each_key(digests: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Sorted positions of the first candidate row of each digest."""
    at = np.flatnonzero(candidates)
    return np.sort(at[np.unique(digests[at], return_index=True)[1]])
