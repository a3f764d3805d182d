"""The bottleneck cache: features kept in a handful of content-addressed Parquet files.

Layout under ``bottleneck_dir``::

    <model key>/part-<sha256 of the file>.parquet                  plain features
    <model key>/distorted-<distortion key>/part-<sha256>.parquet   distorted variants
    <folder>/_staging/<run>/part-<sha256>.parquet                  written by Spark tasks, not yet committed

A row is keyed by the SHA-256 of the image bytes (``content``) and a ``variant`` number (0 for plain
features); ``path`` and ``stamp`` (size and mtime as listed) let a warm run find an image's content
key without reading it. An image that cannot be decoded is cached too, with its ``error``, so it
is reported on every run but decoded once. Each file is named by the hash of its own bytes: a file
whose bytes do not match its name, or that does not parse, is reported, removed and its images are
computed again. Files are written atomically, one per ``flush_rows`` new rows or ``flush_seconds``
of work (whichever comes first, so a killed run keeps most of its work), never one per image
(the small-files problem on HDFS), and small ones are merged when they grow numerous.

Engines that compute on other machines write there: each task writes its rows as part files into
a staging folder of its run (:func:`stage_part`), and the driver moves the files of the one
successful attempt of each task into place and removes the staging folder with whatever failed or
speculative attempts left in it (:func:`commit`), so a retried task never adds a row twice.

In memory a store keeps no Python object per row: its keys are sorted arrays of 16-byte digests
(:func:`key_digests`), its stamps 16-byte digests of path and stamp (:func:`stamp_digests`) next
to 32-byte content keys.
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
import pyarrow.parquet as pq

from lastlayer import storage

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^part-([0-9a-f]{64})\.parquet$")
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
def part_schema(dim: int) -> pa.Schema:
    """The columns of a part file with feature size ``dim``."""
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


def encode_rows(rows: Sequence[Row], dim: int) -> tuple[str, bytes]:
    """``rows`` as the bytes of one part file, and the file's content-addressed name."""
    features = np.stack(
        [np.zeros(dim, np.float32) if r.feature is None else r.feature.astype(np.float32) for r in rows]
    )
    mask = pa.array([r.feature is None for r in rows], pa.bool_())
    table = pa.table(
        {
            "content": [r.content for r in rows],
            "variant": pa.array([r.variant for r in rows], pa.int32()),
            "path": [r.path for r in rows],
            "stamp": [r.stamp for r in rows],
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), dim, mask=mask),
            "error": [r.error for r in rows],
        },
        schema=part_schema(dim),
    )
    return _encode_table(table)


def _encode_table(table: pa.Table) -> tuple[str, bytes]:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none")  # features do not compress; reads stay fast
    data = sink.getvalue()
    return f"part-{hashlib.sha256(data).hexdigest()}.parquet", data


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
    _keys: DigestMap = field(init=False, default_factory=lambda: DigestMap(16, np.int64, first=True))
    _stamps: DigestMap = field(init=False, default_factory=lambda: DigestMap(16, CONTENT, first=False))
    _errors: dict[str, str] = field(init=False, default_factory=dict)
    _pending: list[Row] = field(init=False, default_factory=list)
    _parts: dict[str, int] = field(init=False, default_factory=dict)
    _chunks: list[np.ndarray] = field(init=False, default_factory=list)
    _rows: int = field(init=False, default=0)
    _last_flush: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.features = np.zeros((0, self.dim), np.float32)
        self.refresh()

    # -- reading ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the part files this store has not read yet (all of them at first; later those that
        Spark tasks or other processes wrote meanwhile). Another process may compact the folder
        meanwhile (its merged file is written before the parts it replaces are removed): a part that
        vanished is skipped and the folder listed again, up to :data:`LOAD_ATTEMPTS` times."""
        fs, root = storage.url_to_fs(self.url, self.storage_options)
        seen: set[str] = set(self._parts)
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
                elif table is None or not self._add_table(table):
                    self._remove_damaged(fs, root, name)
                else:
                    self._parts[name] = table.num_rows
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
        if not table.schema.equals(part_schema(self.dim)):
            return None
        return table

    def _add_table(self, table: pa.Table) -> bool:
        """Add a part's rows (the first row of each key wins); ``False`` if its keys are not content
        keys (a damaged or foreign file), which adds nothing."""
        contents = table.column("content").to_pylist()
        try:
            digests = key_digests(contents, table.column("variant").to_numpy())
        except ValueError:
            return False
        feats = table.column("feature").combine_chunks()
        values = feats.values.to_numpy(zero_copy_only=False) if len(feats) else np.zeros(0, np.float32)
        matrix = np.asarray(values, np.float32).reshape(-1, self.dim)
        nulls = np.asarray(feats.is_null()) if feats.null_count else np.zeros(len(feats), bool)
        if feats.null_count:
            matrix = matrix.copy()
            matrix[nulls] = 0.0
        errors = table.column("error").to_pylist()
        self._add_stamps(table, contents)
        has_error = np.array([e is not None for e in errors], bool)
        keep = _first_of_each_key(digests, ~(nulls & ~has_error))
        keep = keep[~self._keys.get_many(digests[keep])[1]]
        self._keys.put_many(digests[keep], self._rows + np.arange(len(keep)))
        for i in keep[has_error[keep]]:
            self._errors[contents[i]] = errors[i]
        if len(keep):
            self._chunks.append(matrix[keep])
            self._rows += len(keep)
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

    def _consolidate(self) -> None:
        if self._chunks:
            self.features = np.concatenate([self.features, *self._chunks])
            self._chunks = []

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

    def row(self, content: str, variant: int = 0) -> int:
        """Row of ``(content, variant)`` in :attr:`features` (call :meth:`flush` first for new rows).

        Raises:
            KeyError: the key is not cached.
        """
        found = self._keys.get(key_digest(content, variant))
        if found is None:
            raise KeyError((content, variant))
        return int(found)

    def __len__(self) -> int:
        return self._rows

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
            self._pending.append(row)
            self._keys.put(digest, self._rows)
            self._rows += 1
            self._chunks.append(
                np.zeros((1, self.dim), np.float32)
                if row.feature is None
                else row.feature.reshape(1, self.dim)
            )
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
        """Write pending rows as one part file and make :attr:`features` cover every row."""
        self._consolidate()
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        name, data = encode_rows(self._pending, self.dim)
        self._write(name, data)
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
            table = self._read_part(fs, posixpath.join(root, name), PART_RE.match(name).group(1))  # type: ignore[union-attr]
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
        then remove their files; the number of files merged."""
        table = pa.concat_tables([t for _, t in group])
        digests = key_digests(table.column("content").to_pylist(), table.column("variant").to_numpy())
        record = np.asarray(table.column("feature").is_null()) & np.asarray(table.column("error").is_null())
        keep = np.union1d(np.flatnonzero(record), _first_of_each_key(digests, ~record))
        if len(keep) < table.num_rows:
            table = table.take(keep)
        name, data = _encode_table(table)
        self._write(name, data)
        self._parts[name] = table.num_rows
        for old, _ in group:
            if old != name:
                del self._parts[old]
                with contextlib.suppress(FileNotFoundError):  # another process merged and removed it
                    fs.rm_file(posixpath.join(root, old))
        return len(group)


def _first_of_each_key(digests: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Sorted positions of the first candidate row of each digest."""
    at = np.flatnonzero(candidates)
    return np.sort(at[np.unique(digests[at], return_index=True)[1]])
