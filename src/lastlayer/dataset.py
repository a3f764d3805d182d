"""The labelled image folder: classes, files and the stable train/validation/test split.

``image_dir`` holds one sub-folder per class (any depth of folders below it). Labels and the split
follow retrain.py, so a data set keeps its split when it moves to another filesystem: the split is
decided by the SHA1 of the path *relative to image_dir*, with any ``_nohash_`` suffix removed.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lastlayer import storage
from lastlayer.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "bmp", "webp"})
#: retrain.py's bucket count for the split hash.
MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1
#: Fewer images than this in a class earns a warning, as in retrain.py.
MIN_IMAGES_PER_CLASS = 20

TRAINING, VALIDATION, TESTING = "training", "validation", "testing"
SPLITS = (TRAINING, VALIDATION, TESTING)


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


@dataclass(frozen=True)
class ImageSet:
    """All images of ``image_dir`` with their labels (sorted by folder name) and split."""

    image_dir: str
    labels: tuple[str, ...]
    files: tuple[ImageFile, ...]

    def indices(self, split: str) -> list[int]:
        """Positions in :attr:`files` of the images in ``split``."""
        return [i for i, f in enumerate(self.files) if f.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{label: {split: number of images}}``."""
        out = {label: dict.fromkeys(SPLITS, 0) for label in self.labels}
        for f in self.files:
            out[self.labels[f.label_index]][f.split] += 1
        return out


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
    files: list[ImageFile] = []
    seen_labels: dict[str, str] = {}
    for folder, path in folders:
        label = label_for(folder)
        try:
            found = fs.find(path, detail=True)
        except Exception as exc:
            raise storage.describe(exc, path, "list") from exc
        images = sorted(
            (p, info)
            for p, info in found.items()
            if info.get("type") == "file" and _is_image(posixpath.basename(p))
        )
        if not images:
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
        if len(images) < MIN_IMAGES_PER_CLASS:
            log.warning(
                "Folder %s has less than %d images, which may cause issues.", folder, MIN_IMAGES_PER_CLASS
            )
        index = len(labels)
        labels.append(label)
        for p, info in images:
            rel = posixpath.relpath(p, root)
            files.append(
                ImageFile(
                    storage.join(image_dir, rel),
                    rel,
                    index,
                    which_set(rel, testing_percentage, validation_percentage),
                    _stamp(info),
                )
            )
    if not labels:
        raise DataError(f"no valid folders of images found at {image_dir}: it needs one sub-folder per class")
    if len(labels) == 1:
        raise DataError(
            f"only one valid folder of images found at {image_dir}: "
            "multiple classes are needed for classification"
        )
    return ImageSet(image_dir, tuple(labels), tuple(files))
