"""Spark's staging: each task writes its rows as part files into a staging folder of its run, and the
driver moves the files of the one successful attempt of each task into place (:func:`commit`), so a
retried task never adds a row twice.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lastlayer import storage
from lastlayer.bottlenecks.parts import Row, encode_rows

#: The logger name its lines always had (``lastlayer.cache``), whatever the module's name.
log = logging.getLogger("lastlayer.cache")

#: The folder of staged part files, inside a cache folder (the loader lists only ``part-*`` files).
STAGING = "_staging"


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
