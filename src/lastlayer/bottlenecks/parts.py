"""Part files: the Parquet format of the cache's files, named by the SHA-256 of their bytes, and the
locations (part number and row packed in an int64) by which a :class:`FeatureSource` reads features.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lastlayer import storage
from lastlayer.errors import DataError

#: The logger name its lines always had (``lastlayer.cache``), whatever the module's name.
log = logging.getLogger("lastlayer.cache")

#: A part file's name: the SHA-256 of its bytes, ``.v2`` for the current format (see the module doc).
PART_RE = re.compile(r"^part-([0-9a-f]{64})(\.v2)?\.parquet$")
#: Bits of a location (see :func:`pack`) that hold the row in its part.
ROW_BITS = 32
#: The columns of a part file that a store loads (all but ``feature``).
KEY_COLUMNS = ("content", "variant", "path", "stamp", "error", "has_feature")


@dataclass(frozen=True)
class Row:
    """One cached result.

    Attributes:
        content: SHA-256 hex of the image bytes.
        variant: 0 for plain features, else the distorted variant number.
        path: the image's path relative to image_dir when it was computed.
        stamp: ``"<size>:<mtime>"`` when it was computed, or ``None``.
        feature: ``float32 [D]`` (``float16`` for a network's activations, ``--train_top``), or ``None``
            when the image could not be decoded.
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


# -- part files --------------------------------------------------------------------------------
def part_schema(dim: int, legacy: bool = False, half: bool = False) -> pa.Schema:
    """The columns of a part file with feature size ``dim`` (``legacy``: of the files written before
    the ``has_feature`` column; ``half``: float16 features, a network's cached activations)."""
    fields = [
        ("content", pa.string()),
        ("variant", pa.int32()),
        ("path", pa.string()),
        ("stamp", pa.string()),
        ("feature", pa.list_(pa.float16() if half else pa.float32(), dim)),
        ("error", pa.string()),
    ]
    return pa.schema(fields if legacy else [*fields, ("has_feature", pa.bool_())])


def part_schemas(dim: int) -> tuple[pa.Schema, ...]:
    """Every schema a part file of feature size ``dim`` may have."""
    return part_schema(dim), part_schema(dim, legacy=True), part_schema(dim, half=True)


def encode_rows(rows: Sequence[Row], dim: int) -> tuple[str, bytes]:
    """``rows`` as the bytes of one part file, and the file's content-addressed name; its features are
    float16 when the rows' are (a network's activations), else float32."""
    half = any(r.feature is not None and r.feature.dtype == np.float16 for r in rows)
    dtype = np.float16 if half else np.float32
    features = np.stack(
        [np.zeros(dim, dtype) if r.feature is None else r.feature.astype(dtype) for r in rows]
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
        schema=part_schema(dim, half=half),
    )
    return encode_table(table)


def encode_table(table: pa.Table) -> tuple[str, bytes]:
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


def parse(data: bytes, dim: int, columns: Sequence[str] | None = None) -> pa.Table | None:
    """The table (``columns`` of it) of a part file's bytes, in the current format; ``None`` when the
    bytes are not a part file of feature size ``dim``."""
    try:
        # one thread: Arrow's reader threads can outlive the interpreter and abort the process at
        # exit (apache/arrow#34314: 8 of 30 short runs of a cache writer died with SIGABRT)
        parquet = pq.ParquetFile(io.BytesIO(data), page_checksum_verification=True, pre_buffer=False)
        if parquet.schema_arrow not in part_schemas(dim):
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
        table = parse(data, self.dim, ["feature"])
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
