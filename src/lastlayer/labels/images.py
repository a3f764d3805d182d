"""An :class:`~lastlayer.dataset.ImageSet` from a labels file: its rows joined to the images listed
under ``image_dir``, bad rows reported by line, and each image's split from its row, its group or its
path (retrain.py's hash, applied to the group's name for a group)."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import split_protocol

from lastlayer import storage
from lastlayer.dataset import (
    CHUNK,
    HASH_OF_GROUP,
    HASH_OF_PATH,
    MIN_IMAGES_PER_CLASS,
    SPLIT_COLUMN,
    SPLITS,
    ImageSet,
    list_images,
    scan,
    which_set,
)
from lastlayer.errors import DataError
from lastlayer.labels.rows import SEPARATOR, SHOWN, BadRows, Rows, read_rows
from lastlayer.settings.run import TrainingConfig

log = logging.getLogger(__name__)

#: Where an image in a group whose other rows name a split took its split from.
GROUP_SPLIT_COLUMN = "split column of its group"
#: What ``--bad_label_rows`` takes.
SKIP, REFUSE = "skip", "refuse"


def image_set(
    image_dir: str, training: TrainingConfig, storage_options: Mapping[str, Any] | None
) -> ImageSet:
    """The images of ``image_dir`` with the labels of ``training.labels_file``, or of their class
    folders when it names none; splits as :func:`read_labels` or :func:`~lastlayer.dataset.scan` give."""
    percentages = (training.testing_percentage, training.validation_percentage)
    if not training.labels_file:
        return scan(image_dir, *percentages, storage_options)
    return read_labels(
        image_dir,
        training.labels_file,
        percentages,
        training.bad_label_rows,
        storage_options,
        training.multi_label,
    )


def read_labels(
    image_dir: str,
    labels_file: str,
    percentages: tuple[float, float],
    bad_rows: str = SKIP,
    storage_options: Mapping[str, Any] | None = None,
    multi: bool = False,
) -> ImageSet:
    """The images that the labels file ``labels_file`` names under ``image_dir``.

    Args:
        percentages: ``(testing, validation)`` percentages for the images its rows give no split.
        bad_rows: :data:`SKIP` (warn, with line numbers) or :data:`REFUSE` (raise).
        multi: every label of the ``labels`` column counts (:attr:`ImageSet.multi_hot`), not only
            each image's first.

    Raises:
        DataError: no folder at ``image_dir``, bad rows with :data:`REFUSE`, a group given two splits,
            fewer than two labels, or a file :func:`~lastlayer.labels.rows.read_rows` refuses.
        StorageError: the file or the folder cannot be read.
    """
    rows, bad = read_rows(labels_file, storage_options)
    fs, root = storage.url_to_fs(image_dir, storage_options)
    root = root.rstrip("/")
    try:
        folder = fs.isdir(root)
    except Exception as exc:
        raise storage.describe(exc, image_dir, "list") from exc
    if not folder:
        raise DataError(
            f"--image_dir {image_dir} is not a folder: point it at the folder the labels file's paths "
            "are under"
        )
    listed, stamps = list_images(fs, root, root)
    relpaths = _relative(rows, image_dir, root, fs, bad)
    found = pc.index_in(relpaths, value_set=listed)
    keep = _report(rows, relpaths, found, bad, labels_file, bad_rows)
    rows = Rows(
        rows.line[keep],
        rows.path.filter(keep),
        rows.label.filter(keep),
        rows.split[keep],
        rows.group.filter(keep),
        rows.labels.filter(keep),
    )
    at = found.filter(keep).to_numpy(zero_copy_only=False).astype(np.int64)
    return _image_set(image_dir, labels_file, rows, listed.take(at), stamps.take(at), percentages, multi)


def _relative(rows: Rows, image_dir: str, root: str, fs: Any, bad: BadRows) -> pa.Array:
    """Each row's path relative to ``image_dir`` (null where it names a place outside it, added to
    ``bad``)."""
    out: list[pa.Array] = []
    for start in range(0, len(rows.path), CHUNK):
        paths = rows.path.slice(start, CHUNK).to_pylist()
        rel: list[str | None] = []
        for line, path in zip(rows.line[start : start + CHUNK].tolist(), paths, strict=True):
            inner = _inner(path, image_dir, root, fs)
            clean = posixpath.normpath(inner) if inner else None
            if clean is None or clean == ".." or clean.startswith(("../", "/")):
                bad.add(line, f"{path!r} is not under --image_dir {image_dir}")
                clean = None
            rel.append(clean)
        out.append(pa.array(rel, pa.large_string()))
    return pa.concat_arrays(out) if out else pa.array([], pa.large_string())


def _inner(path: str, image_dir: str, root: str, fs: Any) -> str | None:
    """``path`` relative to the folder ``root`` of ``fs`` (``image_dir``): as written when relative; a
    full path or URL on the same filesystem (and host) when below it; else ``None``."""
    if "://" in path:
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if split_protocol(path)[0] not in protocols:
            return None
        if "://" in image_dir and urlsplit(path).netloc != urlsplit(image_dir).netloc:
            return None
        path = fs._strip_protocol(path)
    elif not path.startswith("/"):
        return path
    return path[len(root) + 1 :] if path.startswith(root + "/") else None


def _report(
    rows: Rows, relpaths: pa.Array, found: pa.Array, bad: BadRows, labels_file: str, policy: str
) -> np.ndarray:
    """``bool [N]``: the rows kept: those naming an image found under the folder, once each. Adds the
    others to ``bad``, then warns about them all or (``policy`` :data:`REFUSE`) raises."""
    at = found.fill_null(-1).to_numpy(zero_copy_only=False)
    missing = np.flatnonzero((at < 0) & relpaths.is_valid().to_numpy(zero_copy_only=False))
    for i in missing[:SHOWN].tolist():
        bad.add(int(rows.line[i]), f"no image {rows.path[i].as_py()!r} under --image_dir")
    bad.count += max(len(missing) - SHOWN, 0)
    keep = at >= 0
    unique, first = np.unique(at, return_index=True)
    again = np.setdiff1d(np.flatnonzero(keep), first)
    for i in again.tolist()[:SHOWN]:
        same = int(first[np.searchsorted(unique, at[i])])
        bad.add(int(rows.line[i]), f"the image of line {int(rows.line[same])} again")
    bad.count += max(len(again) - SHOWN, 0)
    keep[again] = False
    if bad.count and policy == REFUSE:
        raise DataError(
            f"{labels_file}: {bad.text()}; fix them, or pass --bad_label_rows=skip to train without them"
        )
    if bad.count:
        log.warning("%s: skipped %s", labels_file, bad.text())
    return keep


def _image_set(
    image_dir: str,
    labels_file: str,
    rows: Rows,
    relpaths: pa.Array,
    stamps: pa.Array,
    percentages: tuple[float, float],
    multi: bool = False,
) -> ImageSet:
    """The kept rows as an ImageSet: labels sorted, images by label then path (as the folder scan
    orders them); with ``multi``, every label of the ``labels`` column and the multi-hot matrix."""
    each = pc.split_pattern(rows.labels, SEPARATOR)
    labels = pc.unique(pc.list_flatten(each) if multi else rows.label).sort().to_pylist()
    if len(labels) < 2:
        raise DataError(
            f"{labels_file} gives {len(labels)} label{'s' * (len(labels) != 1)} to the images it names: "
            "classification needs at least two"
        )
    label_index = pc.index_in(rows.label, value_set=pa.array(labels, pa.large_string())).to_numpy()
    split, sources = _splits(rows, relpaths, percentages, labels_file)
    order = pc.sort_indices(
        pa.table({"label": label_index, "path": relpaths}),
        sort_keys=[("label", "ascending"), ("path", "ascending")],
    ).to_numpy()
    counts = np.bincount(label_index, minlength=len(labels))
    for label, n in zip(labels, counts.tolist(), strict=True):
        if n < MIN_IMAGES_PER_CLASS:
            log.warning(
                "Label %s has less than %d images, which may cause issues.", label, MIN_IMAGES_PER_CLASS
            )
    return ImageSet(
        image_dir,
        tuple(labels),
        relpaths.take(order),
        label_index[order].astype(np.int32),
        split[order],
        stamps.take(order),
        {"labels": labels_file, "splits": sources},
        _multi_hot(each, labels)[order] if multi else None,
    )


def _multi_hot(each: pa.Array, labels: list[str]) -> np.ndarray:
    """``bool [N, L]``: whether row ``i`` (a list array of label names) has label ``j``."""
    flat = pc.list_flatten(each)
    column = pc.index_in(flat, value_set=pa.array(labels, pa.large_string())).to_numpy()
    out = np.zeros((len(each), len(labels)), bool)
    out[pc.list_parent_indices(each).to_numpy(), column] = True
    return out


def _splits(
    rows: Rows, relpaths: pa.Array, percentages: tuple[float, float], labels_file: str
) -> tuple[np.ndarray, dict[str, int]]:
    """``int8 [N]`` each image's split, and how many images took it from each source: its row's
    ``split``, its group (the ``split`` other rows of the group give, else the hash of the group's
    name), or the hash of its path."""
    split = rows.split.copy()
    explicit = split >= 0
    has_group = rows.group.is_valid().to_numpy(zero_copy_only=False)
    grouped = has_group & ~explicit
    named = pa.table({"group": rows.group, "split": split}).filter(pa.array(explicit & has_group))
    given = named.group_by("group").aggregate([("split", "min"), ("split", "max")])
    conflict = given.filter(pc.not_equal(given["split_min"], given["split_max"]))["group"]
    if len(conflict):
        raise DataError(
            f"{labels_file}: the rows of group {conflict[0].as_py()!r} (and {len(conflict) - 1} other "
            "groups) name different splits; a group keeps its images in one split: give its rows one "
            "split, or none"
        )
    groups = rows.group.filter(pa.array(grouped))
    names = pc.unique(groups)
    at = pc.index_in(names, value_set=given["group"]).fill_null(-1).to_numpy(zero_copy_only=False)
    by_name = _hashed(names, percentages)
    by_name[at >= 0] = given["split_min"].to_numpy()[at[at >= 0]]
    of_group = pc.index_in(groups, value_set=names).to_numpy()
    split[grouped] = by_name[of_group]
    plain = ~explicit & ~grouped
    split[plain] = _hashed(relpaths.filter(pa.array(plain)), percentages)
    sources = {
        SPLIT_COLUMN: int(explicit.sum()),
        GROUP_SPLIT_COLUMN: int((at[of_group] >= 0).sum()),
        HASH_OF_GROUP: int((at[of_group] < 0).sum()),
        HASH_OF_PATH: int(plain.sum()),
    }
    return split, {k: v for k, v in sources.items() if v}


def _hashed(names: pa.Array, percentages: tuple[float, float]) -> np.ndarray:
    """``int8 [N]``: the split retrain.py's hash gives each name, :data:`CHUNK` names at a time."""
    out = np.empty(len(names), np.int8)
    for start in range(0, len(names), CHUNK):
        chunk = names.slice(start, CHUNK).to_pylist()
        out[start : start + len(chunk)] = [SPLITS.index(which_set(n, *percentages)) for n in chunk]
    return out
