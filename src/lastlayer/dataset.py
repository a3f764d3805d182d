"""The labelled image folder: classes, files and the stable train/validation/test split.

``image_dir`` holds one sub-folder per class (any depth of folders below it). Labels and the split
follow retrain.py, so a data set keeps its split when it moves to another filesystem: the split is
decided by the SHA1 of the path *relative to image_dir*, with any ``_nohash_`` suffix removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import stat
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem
from hdfs_native.fsspec import HdfsFileSystem

from lastlayer import storage
from lastlayer.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "bmp", "webp"})
#: retrain.py's bucket count for the split hash.
MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1
#: Fewer images than this in a class earns a warning, as in retrain.py.
MIN_IMAGES_PER_CLASS = 20
#: Listed images gathered into one Arrow array at a time (bounds the Python objects of a listing).
CHUNK = 65536

TRAINING, VALIDATION, TESTING = "training", "validation", "testing"
SPLITS = (TRAINING, VALIDATION, TESTING)
#: Where an image's split came from (:attr:`ImageSet.origin`).
HASH_OF_PATH, HASH_OF_GROUP, SPLIT_COLUMN = "hash of the path", "hash of the group", "split column"


@dataclass(frozen=True)
class ImageFile:
    """One image of the data set.

    Attributes:
        url: full URL of the file.
        relpath: posix path relative to ``image_dir`` (``<class folder>/.../<name>``).
        label_index: index into :attr:`ImageSet.labels`.
        split: one of :data:`SPLITS`.
        stamp: ``"<size>:<mtime>"`` as listed by the filesystem, or ``None`` when it gives no mtime.
    """

    url: str
    relpath: str
    label_index: int
    split: str
    stamp: str | None


@dataclass(frozen=True, eq=False)
class ImageSet:
    """All images of ``image_dir`` with their labels (sorted by folder name) and split, kept as columns:
    about 80 bytes per image and no Python object per image (:attr:`files` makes them on access).

    Attributes:
        relpaths: ``large_string [N]`` each image's path relative to ``image_dir``.
        label_index: ``int32 [N]`` index into :attr:`labels`.
        split_index: ``int8 [N]`` index into :data:`SPLITS`.
        stamps: ``large_string [N]`` ``"<size>:<mtime>"`` as listed, null when the filesystem gives
            no mtime.
        origin: where the labels and splits came from (``labels``: "class folders" or the labels
            file's URL; ``splits``: images per source of their split), for the run summary.
        multi_hot: ``bool [N, L]`` every label of each image (``--multi_label``), else ``None``.
    """

    image_dir: str
    labels: tuple[str, ...]
    relpaths: pa.Array
    label_index: np.ndarray
    split_index: np.ndarray
    stamps: pa.Array
    origin: Mapping[str, Any] = field(default_factory=dict)
    multi_hot: np.ndarray | None = None

    @property
    def files(self) -> ImageFiles:
        """The images as a sequence of :class:`ImageFile`."""
        return ImageFiles(self)

    def hot(self) -> np.ndarray:
        """``bool [N, L]``: :attr:`multi_hot`, or each image's one label as a one-hot row."""
        if self.multi_hot is not None:
            return self.multi_hot
        return np.eye(len(self.labels), dtype=bool)[self.label_index]

    def indices(self, split: str) -> np.ndarray:
        """``int64 [N_split]`` positions in :attr:`files` of the images in ``split``."""
        return np.flatnonzero(self.split_index == SPLITS.index(split))

    def counts(self) -> dict[str, dict[str, int]]:
        """``{label: {split: number of images}}``."""
        both = np.bincount(
            self.label_index.astype(np.int64) * len(SPLITS) + self.split_index, minlength=len(self.labels) * 3
        ).reshape(len(self.labels), len(SPLITS))
        return {
            label: dict(zip(SPLITS, map(int, row), strict=True))
            for label, row in zip(self.labels, both, strict=True)
        }


class ImageFiles(Sequence[ImageFile]):
    """The images of an :class:`ImageSet` as :class:`ImageFile` s, made when read."""

    def __init__(self, images: ImageSet) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images.label_index)

    @overload
    def __getitem__(self, i: int) -> ImageFile: ...
    @overload
    def __getitem__(self, i: slice) -> list[ImageFile]: ...
    def __getitem__(self, i: int | slice) -> ImageFile | list[ImageFile]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        m = self.images
        return self._file(
            m.relpaths[i].as_py(), int(m.label_index[i]), int(m.split_index[i]), m.stamps[i].as_py()
        )

    def __iter__(self) -> Iterator[ImageFile]:
        return self.at(np.arange(len(self)))

    def at(self, positions: np.ndarray) -> Iterator[ImageFile]:
        """The images at ``positions`` (``int64 [K]``), read :data:`CHUNK` at a time."""
        m = self.images
        for start in range(0, len(positions), CHUNK):
            chunk = positions[start : start + CHUNK]
            rel = m.relpaths.take(chunk).to_pylist()
            stamps = m.stamps.take(chunk).to_pylist()
            yield from map(
                self._file, rel, m.label_index[chunk].tolist(), m.split_index[chunk].tolist(), stamps
            )

    def _file(self, relpath: str, label: int, split: int, stamp: str | None) -> ImageFile:
        return ImageFile(storage.join(self.images.image_dir, relpath), relpath, label, SPLITS[split], stamp)


def label_for(folder: str) -> str:
    """The label of a class folder: lower-cased, each run of characters that are not letters or
    digits becomes one space (retrain.py's rule for ASCII; letters of any script are kept)."""
    name = unicodedata.normalize("NFC", folder).lower()
    return re.sub(r"[\W_]+", " ", name).strip()


def which_set(relpath: str, testing_percentage: float, validation_percentage: float) -> str:
    """The split of an image, decided by the SHA1 of its relative path without ``_nohash_...``."""
    hash_name = re.sub(r"_nohash_.*$", "", relpath)
    digest = int(hashlib.sha1(hash_name.encode("utf-8")).hexdigest(), 16)
    percentage = (digest % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)
    if percentage < validation_percentage:
        return VALIDATION
    if percentage < testing_percentage + validation_percentage:
        return TESTING
    return TRAINING


def _stamp(info: Mapping[str, Any]) -> str | None:
    mtime = info.get("mtime", info.get("modification_time", info.get("LastModified")))
    if mtime is None:
        return None
    return f"{info.get('size')}:{mtime}"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and "." in name


def _walk_files(fs: Any, root: str, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every file under ``path`` with its size and mtime as the filesystem lists them, streamed:
    hdfs-native lists the whole tree a page at a time and a local folder is read one name at a time,
    so a folder of millions of files never sits in memory as a listing; other filesystems go one
    folder at a time (fsspec's ``walk``)."""
    if isinstance(fs, HdfsFileSystem):
        for status in fs.client.list_status(path, True):
            if not status.isdir:
                yield status.path, {"size": status.length, "modification_time": status.modification_time}
    elif isinstance(fs, LocalFileSystem):
        yield from _walk_local(root, path)
    else:
        for _, _, files in fs.walk(path, detail=True):
            for info in files.values():
                if info.get("type") == "file":
                    yield info["name"], info


def _walk_local(root: str, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every regular file under the local folder ``path`` (inside the image folder ``root``), one
    folder read at a time. Written here because ``os.walk`` follows every link or none: a link to a
    folder is followed only when it stays inside ``root`` and is not a loop (a link to a folder
    above it, or one already listed); a FIFO, device or socket (or a link to one) is skipped, never
    opened. Each thing skipped gets a warning."""
    real_root = os.path.realpath(root)
    pending, seen = [path], set()
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if not (real + "/").startswith(real_root.rstrip("/") + "/"):
            log.warning("Skipped %s: a link out of the image folder (to %s)", folder, real)
            continue
        if real in seen or (
            folder != path and (os.path.realpath(os.path.dirname(folder)) + "/").startswith(real + "/")
        ):
            log.warning("Skipped %s: a link back to a folder above it or already listed (a loop)", folder)
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):  # gone since its folder was read
            continue
        for entry in entries:
            try:
                if entry.is_dir():  # follows a link: checked above when its turn comes
                    pending.append(entry.path)
                    continue
                info = entry.stat()
            except FileNotFoundError:  # gone since the folder was read, or a broken link
                continue
            if stat.S_ISREG(info.st_mode):
                yield entry.path, {"size": info.st_size, "mtime": info.st_mtime}
            elif _is_image(entry.name):
                log.warning("Skipped %s: not a regular file (a FIFO, device or socket)", entry.path)


def list_images(fs: Any, root: str, path: str) -> tuple[pa.Array, pa.Array]:
    """The images under the class folder ``path``: relative paths (sorted) and stamps, as arrays."""
    rel: list[pa.Array] = []
    stamps: list[pa.Array] = []
    names: list[str] = []
    marks: list[str | None] = []
    prefix = root + "/"
    try:
        for p, info in _walk_files(fs, root, path):
            if _is_image(posixpath.basename(p)):
                names.append(p[len(prefix) :] if p.startswith(prefix) else posixpath.relpath(p, root))
                marks.append(_stamp(info))
            if len(names) >= CHUNK:
                rel.append(pa.array(names, pa.large_string()))
                stamps.append(pa.array(marks, pa.large_string()))
                names, marks = [], []
    except Exception as exc:
        raise storage.describe(exc, path, "list") from exc
    rel.append(pa.array(names, pa.large_string()))
    stamps.append(pa.array(marks, pa.large_string()))
    relpaths = pa.concat_arrays(rel)
    order = pc.sort_indices(relpaths)
    return relpaths.take(order), pa.concat_arrays(stamps).take(order)


def scan(
    image_dir: str,
    testing_percentage: float,
    validation_percentage: float,
    storage_options: Mapping[str, Any] | None = None,
) -> ImageSet:
    """List the classes and images under ``image_dir``.

    Raises:
        DataError: the folder is missing, two folders give the same label, or fewer than two
            classes hold images.
    """
    fs, root = storage.url_to_fs(image_dir, storage_options)
    root = root.rstrip("/")
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError as exc:
        raise DataError(
            f"--image_dir {image_dir} does not exist: point it at a folder of class folders"
        ) from exc
    except Exception as exc:
        raise storage.describe(exc, image_dir, "list") from exc
    folders = sorted(
        (posixpath.basename(e["name"].rstrip("/")), e["name"].rstrip("/"))
        for e in entries
        if e["type"] == "directory" and not posixpath.basename(e["name"].rstrip("/")).startswith(".")
    )
    labels: list[str] = []
    classes: list[tuple[pa.Array, pa.Array]] = []
    seen_labels: dict[str, str] = {}
    for folder, path in folders:
        label = label_for(folder)
        relpaths, stamps = list_images(fs, root, path)
        if not len(relpaths):
            log.warning("No images found in %s: skipped", folder)
            continue
        if not label:
            raise DataError(f"class folder {folder!r} gives an empty label: rename it with letters or digits")
        if label in seen_labels:
            raise DataError(
                f"class folders {seen_labels[label]!r} and {folder!r} both give the label {label!r}: "
                "rename one"
            )
        seen_labels[label] = folder
        if len(relpaths) < MIN_IMAGES_PER_CLASS:
            log.warning(
                "Folder %s has less than %d images, which may cause issues.", folder, MIN_IMAGES_PER_CLASS
            )
        labels.append(label)
        classes.append((relpaths, stamps))
    if not labels:
        raise DataError(f"no valid folders of images found at {image_dir}: it needs one sub-folder per class")
    if len(labels) == 1:
        raise DataError(
            f"only one valid folder of images found at {image_dir}: "
            "multiple classes are needed for classification"
        )
    relpaths = pa.concat_arrays([r for r, _ in classes])
    splits = [
        SPLITS.index(which_set(rel, testing_percentage, validation_percentage))
        for start in range(0, len(relpaths), CHUNK)
        for rel in relpaths.slice(start, CHUNK).to_pylist()
    ]
    return ImageSet(
        image_dir,
        tuple(labels),
        relpaths,
        np.concatenate([np.full(len(r), i, np.int32) for i, (r, _) in enumerate(classes)]),
        np.array(splits, np.int8),
        pa.concat_arrays([t for _, t in classes]),
        {"labels": "class folders", "splits": {HASH_OF_PATH: len(splits)}},
    )
