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
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lastlayer import storage
from lastlayer.errors import DataError

log = logging.getLogger(__name__)

#: A part file's name: the SHA-256 of its bytes, ``.v2`` for the current format (see the module doc).
PART_RE = re.compile(r"^part-([0-9a-f]{64})(\.v2)?\.parquet$")
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
#: The folder of staged part files, inside a cache folder (the loader lists only ``part-*`` files).
STAGING = "_staging"
#: Single additions kept in a dict before they are merged into a store's sorted arrays.
RECENT_MAX = 65536
#: A part file up to this size is read whole (one request, and its hash checked) when its keys are
#: loaded; of a larger one only the key columns are read.
WHOLE_READ_BYTES = 1 << 20
#: Bits of a location (see :func:`pack`) that hold the row in its part.
ROW_BITS = 32
#: The columns of a part file that a store loads (all but ``feature``).
KEY_COLUMNS = ("content", "variant", "path", "stamp", "error", "has_feature")

#: A key digest (see :func:`key_digests`), a stamp digest and a content key, as numpy types.
KEY = np.dtype("V16")
STAMP = np.dtype("V16")
CONTENT = np.dtype("V32")

#: What :meth:`FeatureStore._read_part` returns for a part another process removed meanwhile.
_VANISHED = pa.table({})
#: Hex digit (ASCII code) to its value; 255 for anything else.
_NIBBLE = np.full(256, 255, np.uint8)
for _digit in b"0123456789abcdef":
    _NIBBLE[_digit] = int(chr(_digit), 16)


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


# -- digests ----------------------------------------------------------------------------------
def content_bytes(contents: Sequence[str]) -> np.ndarray:
    """``uint8 [n, 32]``: the bytes of each SHA-256 hex content key.

    Raises:
        ValueError: a key is not 64 lower-case hex digits.
    """
    try:
        text = np.array(contents, dtype="S65").reshape(-1)
    except UnicodeEncodeError as exc:
        raise ValueError("a content key is not 64 hex digits") from exc
    chars = text.view(np.uint8).reshape(len(text), 65)
    nibbles = _NIBBLE[chars[:, :64]]
    if chars[:, 64].any() or (nibbles > 15).any():
        raise ValueError("a content key is not 64 hex digits")
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]


def key_digests(contents: Sequence[str], variants: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """``V16 [n]``: the digest of each ``(content, variant)`` key: the 32 bytes of the content key
    folded to 12 by XOR, then the variant as 4 big-endian bytes.

    Two of n keys share a digest with odds of about n² / 2⁹⁷ (10⁻¹⁴ for 6·10⁷ keys, ten million
    images with five variants each): exact in practice, with no Python object per key.
    """
    return fold_keys(content_bytes(contents), variants)


def fold_keys(raw: np.ndarray, variants: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """:func:`key_digests` of content keys given as bytes, ``uint8 [n, 32]`` or ``V32 [n]``."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, 32)
    out = np.zeros((len(raw), 16), np.uint8)
    out[:, :12] = raw[:, :12] ^ raw[:, 12:24]
    out[:, :8] ^= raw[:, 24:]
    number = np.ascontiguousarray(np.broadcast_to(np.asarray(variants, ">u4"), (len(raw),)))
    out[:, 12:] = number.view(np.uint8).reshape(-1, 4)
    return out.view(KEY).reshape(-1)


def _lookup(keys: np.ndarray, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the sorted ``keys`` of ``probes`` (meaningless where missing), and where found."""
    if not len(keys):
        return np.zeros(len(probes), np.int64), np.zeros(len(probes), bool)
    at = np.minimum(np.searchsorted(keys, probes), len(keys) - 1)
    return at, keys[at] == probes


def _errors_among(contents: np.ndarray, errors: Mapping[str, str]) -> np.ndarray:
    """``bool [n]``: which of the ``V32 [n]`` content keys have a cached decode error."""
    if not errors:
        return np.zeros(len(contents), bool)
    failed = {bytes.fromhex(c) for c in errors}
    return np.fromiter((c.tobytes() in failed for c in contents), bool, len(contents))


def key_digest(content: str, variant: int = 0) -> bytes:
    """The digest of one key: :func:`key_digests` of one key, in plain Python (numpy costs tens of
    microseconds per call, and the need test asks this for every image and variant).

    Raises:
        ValueError: ``content`` is not 64 hex digits.
    """
    raw = bytes.fromhex(content)
    if len(content) != 64:
        raise ValueError("a content key is not 64 hex digits")
    folded = int.from_bytes(raw[:12]) ^ int.from_bytes(raw[12:24]) ^ (int.from_bytes(raw[24:]) << 32)
    return folded.to_bytes(12) + variant.to_bytes(4)


def stamp_digest(path: str, stamp: str) -> bytes:
    """The first 16 bytes of the SHA-256 of ``path``, NUL, ``stamp``."""
    return hashlib.sha256(f"{path}\0{stamp}".encode()).digest()[:16]


def stamp_digests(paths: Sequence[str], stamps: Sequence[str]) -> np.ndarray:
    """``V16 [n]``: :func:`stamp_digest` of each path and stamp."""
    return np.frombuffer(b"".join(map(stamp_digest, paths, stamps)), STAMP)


class DigestMap:
    """Fixed-width digests to values: sorted arrays plus a dict of the latest single additions (merged
    in when it grows past :data:`RECENT_MAX` or an eighth of the arrays), so no Python object per entry
    lives for long and a lookup is a binary search.

    Attributes:
        keys: sorted digests (those merged so far).
        values: the value of each of :attr:`keys`.
        first: whether the first value given for a digest wins (else the last).
    """

    def __init__(self, width: int, value_dtype: np.dtype | str, first: bool) -> None:
        self.keys = np.zeros(0, f"V{width}")
        self.values = np.zeros(0, value_dtype)
        self.first = first
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._recent: dict[bytes, Any] = {}

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """:attr:`keys` and :attr:`values` with every addition merged in."""
        self._merge()
        return self.keys, self.values

    def put_many(self, digests: np.ndarray, values: np.ndarray) -> None:
        """Add ``digests`` with ``values`` (after everything added so far)."""
        self._spill()
        self._chunks.append((digests, np.asarray(values, self.values.dtype)))

    def put(self, digest: bytes, value: Any) -> None:
        """Add one digest (ignored when ``first`` and the digest is known)."""
        if self.first and self.get(digest) is not None:
            return
        self._recent[digest] = value
        if len(self._recent) > max(RECENT_MAX, len(self.keys) // 8):
            self._merge()

    def get(self, digest: bytes) -> Any:
        """The value of ``digest``, or ``None``."""
        if digest in self._recent:
            return self._recent[digest]
        if self._chunks:
            self._merge()
        probe = np.frombuffer(digest, self.keys.dtype)
        i = int(np.searchsorted(self.keys, probe)[0])
        return self.values[i] if i < len(self.keys) and self.keys[i].tobytes() == digest else None

    def get_many(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The values of ``digests`` (meaningless where missing) and ``bool`` whether each is present."""
        self._merge()
        if not len(self.keys):
            return np.zeros(len(digests), self.values.dtype), np.zeros(len(digests), bool)
        at, found = _lookup(self.keys, digests)
        return self.values[at], found

    def set_many(self, digests: np.ndarray, values: np.ndarray) -> None:
        """Give the ``digests`` that are present these ``values`` (those absent are ignored)."""
        self._merge()
        at, found = _lookup(self.keys, digests)
        self.values[at[found]] = np.asarray(values, self.values.dtype)[found]

    def _spill(self) -> None:
        if self._recent:
            keys = np.frombuffer(b"".join(self._recent), self.keys.dtype)
            self._chunks.append((keys, np.array(list(self._recent.values()), self.values.dtype)))
            self._recent = {}

    def _merge(self) -> None:
        """Sort everything added into the arrays; each intermediate array is let go as soon as it is
        used, so the peak is about twice the arrays."""
        self._spill()
        if not self._chunks:
            return
        parts, self._chunks = [(self.keys, self.values), *self._chunks], []
        keys = np.concatenate([k for k, _ in parts])
        values = np.concatenate([v for _, v in parts])
        del parts
        self.keys, self.values = np.zeros(0, self.keys.dtype), np.zeros(0, self.values.dtype)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        values = values[order]
        del order
        keep = np.ones(len(keys), bool)
        if self.first:
            keep[1:] = keys[1:] != keys[:-1]
        else:
            keep[:-1] = keys[:-1] != keys[1:]
        if keep.all():
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = keys[keep], values[keep]


@dataclass(frozen=True)
class CachedKeys:
    """What a :class:`FeatureStore` holds, without the features: a picklable copy of its lookups, for
    engines that decide on other machines what to compute (16 bytes per cached key).

    Attributes:
        digests: ``V16 [K]`` sorted digests of every cached ``(content, variant)``.
        errors: content key to decode error, for images that could not be decoded.
    """

    digests: np.ndarray
    errors: Mapping[str, str]

    @classmethod
    def empty(cls) -> CachedKeys:
        """Nothing cached."""
        return cls(np.zeros(0, KEY), {})

    def has(self, content: str, variant: int = 0) -> bool:
        """Whether ``(content, variant)`` is cached (as features or as a decode error)."""
        if content in self.errors:
            return True
        return bool(_lookup(self.digests, np.frombuffer(key_digest(content, variant), KEY))[1][0])

    def has_many(self, contents: np.ndarray, variant: int = 0) -> np.ndarray:
        """:meth:`has` of each of the ``V32 [n]`` content keys: ``bool [n]``."""
        return _lookup(self.digests, fold_keys(contents, variant))[1] | _errors_among(contents, self.errors)

    def error(self, content: str) -> str | None:
        """Why this image could not be decoded, if that is what is cached."""
        return self.errors.get(content)

    def failed_many(self, contents: np.ndarray) -> np.ndarray:
        """``bool [n]``: which of the ``V32 [n]`` content keys have a cached decode error."""
        return _errors_among(contents, self.errors)

    def keys(self) -> CachedKeys:
        """Itself: it is already a copy."""
        return self


class ContentKeys:
    """The content keys of N images, each known or not: 33 bytes per image, no Python string.

    Attributes:
        keys: ``V32 [N]`` the keys' bytes (meaningless where unknown).
        known: ``bool [N]`` whether each is known.
    """

    def __init__(self, keys: np.ndarray, known: np.ndarray) -> None:
        self.keys, self.known = keys, known

    def __len__(self) -> int:
        return len(self.known)

    def __getitem__(self, i: int) -> str | None:
        return self.keys[i].tobytes().hex() if self.known[i] else None

    def __setitem__(self, i: int, content: str | None) -> None:
        self.known[i] = content is not None
        if content is not None:
            self.keys[i] = np.frombuffer(bytes.fromhex(content), CONTENT)[0]

    def __iter__(self) -> Iterator[str | None]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class CacheFolders:
    """Where an engine that writes the cache itself puts its rows.

    Attributes:
        plain: the plain features' folder.
        distorted: the distorted variants' folder, or ``None`` without distortions.
        dim: feature size D.
        storage_options: for both folders, as the driver reaches them.
    """

    plain: str
    distorted: str | None
    dim: int
    storage_options: Mapping[str, Any] | None = None


# -- part files --------------------------------------------------------------------------------
def part_schema(dim: int, legacy: bool = False) -> pa.Schema:
    """The columns of a part file with feature size ``dim`` (``legacy``: of the files written before
    the ``has_feature`` column)."""
    fields = [
        ("content", pa.string()),
        ("variant", pa.int32()),
        ("path", pa.string()),
        ("stamp", pa.string()),
        ("feature", pa.list_(pa.float32(), dim)),
        ("error", pa.string()),
    ]
    return pa.schema(fields if legacy else [*fields, ("has_feature", pa.bool_())])


def encode_rows(rows: Sequence[Row], dim: int) -> tuple[str, bytes]:
    """``rows`` as the bytes of one part file, and the file's content-addressed name."""
    features = np.stack(
        [np.zeros(dim, np.float32) if r.feature is None else r.feature.astype(np.float32) for r in rows]
    )
    present = np.array([r.feature is not None for r in rows], bool)
    table = pa.table(
        {
            "content": [r.content for r in rows],
            "variant": pa.array([r.variant for r in rows], pa.int32()),
            "path": [r.path for r in rows],
            "stamp": [r.stamp for r in rows],
            "feature": pa.FixedSizeListArray.from_arrays(
                pa.array(features.reshape(-1)), dim, mask=pa.array(~present)
            ),
            "error": [r.error for r in rows],
            "has_feature": pa.array(present),
        },
        schema=part_schema(dim),
    )
    return _encode_table(table)


def _encode_table(table: pa.Table) -> tuple[str, bytes]:
    sink = io.BytesIO()
    # features do not compress; reads stay fast. Page checksums let a reader of some columns trust them.
    pq.write_table(table, sink, compression="none", write_page_checksum=True)
    data = sink.getvalue()
    return f"part-{hashlib.sha256(data).hexdigest()}.v2.parquet", data


def _current(table: pa.Table) -> pa.Table:
    """A part's table in the current format (a legacy table gains ``has_feature``)."""
    if "has_feature" in table.column_names:
        return table
    return table.append_column("has_feature", pc.invert(table.column("feature").is_null()))


def _parse(data: bytes, dim: int, columns: Sequence[str] | None = None) -> pa.Table | None:
    """The table (``columns`` of it) of a part file's bytes, in the current format; ``None`` when the
    bytes are not a part file of feature size ``dim``."""
    try:
        # one thread: Arrow's reader threads can outlive the interpreter and abort the process at
        # exit (apache/arrow#34314: 8 of 30 short runs of a cache writer died with SIGABRT)
        parquet = pq.ParquetFile(io.BytesIO(data), page_checksum_verification=True, pre_buffer=False)
        if parquet.schema_arrow not in (part_schema(dim), part_schema(dim, legacy=True)):
            return None
        if columns is not None and "has_feature" in parquet.schema_arrow.names:
            return parquet.read(columns=list(columns), use_threads=False)
        table = _current(parquet.read(use_threads=False))
    except (pa.ArrowException, OSError):
        return None
    return table if columns is None else table.select(list(columns))


def pack(parts: np.ndarray | int, rows: np.ndarray | int) -> np.ndarray:
    """``int64``: the locations of ``rows`` of the store's parts numbered ``parts``."""
    return (np.asarray(parts, np.int64) << ROW_BITS) | np.asarray(rows, np.int64)


def unpack(locations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The parts and rows of ``locations`` (``int64``)."""
    return locations >> ROW_BITS, locations & ((1 << ROW_BITS) - 1)


class UnreadablePart(Exception):
    """A part file that a :class:`FeatureSource` could not read.

    Attributes:
        url: the file.
        vanished: whether it is gone (another process merged it) rather than damaged.
    """

    def __init__(self, url: str, vanished: bool) -> None:
        super().__init__(f"{url}: {'gone' if vanished else 'damaged'}")
        self.url, self.vanished = url, vanished


@dataclass(frozen=True)
class FeatureSource:
    """Where the features of a store's rows are: its folder and its part files by number. Picklable,
    a few bytes per part; reads one part at a time.

    Attributes:
        url: the cache folder.
        dim: feature size D.
        names: each part's file name, by its number in locations (``None``: merged into another).
        storage_options: for the folder.
    """

    url: str
    dim: int
    names: tuple[str | None, ...]
    storage_options: Mapping[str, Any] | None = None

    def read(self, part: int, verify: bool = False) -> np.ndarray:
        """``float32 [rows, D]``: the features of every row of part ``part`` (zeros where a row has
        none). The file's pages are checked against their checksums, and with ``verify`` its bytes
        against its name.

        Raises:
            UnreadablePart: the file is gone or damaged.
            StorageError: it cannot be read (storage down, no permission).
        """
        name = self.names[part]
        url = storage.join(self.url, name or "")
        fs, path = storage.url_to_fs(url, self.storage_options)
        try:
            data = storage.read_regular(fs, path, url, storage.MAX_READ_BYTES, "the bottleneck cache file")
        except FileNotFoundError as exc:
            raise UnreadablePart(url, vanished=True) from exc
        except DataError as exc:  # a FIFO, a device, a link to one, or too large
            raise UnreadablePart(url, vanished=False) from exc
        except Exception as exc:
            raise storage.describe(exc, url, "read the bottleneck cache file") from exc
        match = PART_RE.match(name or "")
        if match is None or (verify and hashlib.sha256(data).hexdigest() != match.group(1)):
            raise UnreadablePart(url, vanished=False)
        table = _parse(data, self.dim, ["feature"])
        del data
        if table is None:
            raise UnreadablePart(url, vanished=False)
        feats = table.column("feature").combine_chunks()
        values = feats.values.to_numpy(zero_copy_only=False) if len(feats) else np.zeros(0, np.float32)
        return np.asarray(values, np.float32).reshape(-1, self.dim)

    def rows(self, locations: np.ndarray) -> np.ndarray:
        """``float32 [n, D]``: the features at ``locations``, read a part at a time."""
        out = np.zeros((len(locations), self.dim), np.float32)
        parts, rows = unpack(locations)
        for part in np.unique(parts).tolist():
            at = np.flatnonzero(parts == part)
            out[at] = self.read(part)[rows[at]]
        return out


def remove_damaged(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Report and remove the damaged part file ``url`` (its images are computed again)."""
    log.warning("damaged bottleneck cache file %s: ignored and removed; its images are computed again", url)
    fs, path = storage.url_to_fs(url, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.warning("could not remove %s: %s", url, exc)


def new_run() -> str:
    """A name for one run's staging folder: its start (Unix seconds) and a random part."""
    return f"{int(time.time())}-{uuid.uuid4().hex[:12]}"


def stage_part(folder: str, run: str, rows: Sequence[Row], dim: int, storage_options: Any = None) -> str:
    """Write ``rows`` as one part file into the staging folder of ``run`` in ``folder``; its name."""
    name, data = encode_rows(rows, dim)
    storage.write_atomic(storage.join(folder, STAGING, run, name), data, storage_options)
    return name


def commit(folder: str, run: str, names: Iterable[str], storage_options: Any = None) -> None:
    """Move the staged parts ``names`` of ``run`` into ``folder``, then remove the run's staging
    folder with what other attempts left in it.

    Raises:
        StorageError: a staged part is missing or cannot be moved.
    """
    for name in names:
        storage.rename(storage.join(folder, STAGING, run, name), storage.join(folder, name), storage_options)
    discard(folder, run, storage_options)


def discard(folder: str, run: str, storage_options: Any = None) -> None:
    """Remove the staging folder of ``run`` in ``folder`` (best effort: a leftover is harmless)."""
    fs, root = storage.url_to_fs(storage.join(folder, STAGING, run), storage_options)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.warning("could not remove the staging folder %s: %s", storage.join(folder, STAGING, run), exc)


def discard_stale(folder: str, older_than_s: float, storage_options: Any = None) -> None:
    """Remove the staging folders of runs that started more than ``older_than_s`` ago (a driver
    killed between a task's write and its commit leaves one)."""
    fs, root = storage.url_to_fs(storage.join(folder, STAGING), storage_options)
    try:
        runs = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return
    except Exception as exc:
        log.warning("could not list %s: %s", storage.join(folder, STAGING), exc)
        return
    for run in runs:
        started = run.split("-", 1)[0]
        if started.isdigit() and time.time() - int(started) > older_than_s:
            discard(folder, run, storage_options)


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
        return _parse(data, self.dim)

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
        return _parse(buffer, self.dim, KEY_COLUMNS)

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
        return self._keys.get_many(fold_keys(contents, variant))[1] | _errors_among(contents, self._errors)

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
        return _errors_among(contents, self._errors)

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
        table = pa.concat_tables([t for _, t in group])
        digests = key_digests(table.column("content").to_pylist(), table.column("variant").to_numpy())
        has_feature = table.column("has_feature").fill_null(False).to_numpy(zero_copy_only=False)
        record = ~has_feature & np.asarray(table.column("error").is_null())
        keep = np.union1d(np.flatnonzero(record), _first_of_each_key(digests, ~record))
        if len(keep) < table.num_rows:
            table = table.take(keep)
        name, data = _encode_table(table)
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
