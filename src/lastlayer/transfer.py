"""Uploads: copy a local image folder to ``hdfs://`` (or any fsspec URL) in parallel, resumably.

A file is copied to a temporary name and renamed, so a destination file is either complete or
absent; a re-run skips every destination file whose size already matches and copies the rest.
After copying, each file's size is checked at the destination.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lastlayer import storage
from lastlayer.errors import StorageError

log = logging.getLogger(__name__)

CHUNK = 4 << 20


@dataclass(frozen=True)
class UploadReport:
    """What an upload did.

    Attributes:
        files: files in the source folder.
        copied: files copied in this run.
        skipped: files already complete at the destination.
        bytes_copied: bytes copied in this run.
        seconds: wall time.
    """

    files: int
    copied: int
    skipped: int
    bytes_copied: int
    seconds: float


def _listing(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, int]:
    """``{relative path: size}`` of every file below ``url`` (hidden and temporary files left out)."""
    fs, root = storage.url_to_fs(url, storage_options)
    root = root.rstrip("/")
    try:
        if not fs.exists(root):
            return {}
        found = fs.find(root, detail=True)
    except Exception as exc:
        raise storage.describe(exc, url, "list") from exc
    out = {}
    for path, info in found.items():
        rel = posixpath.relpath(path, root)
        if info.get("type") == "file" and not any(p.startswith(".") for p in rel.split("/")):
            out[rel] = int(info["size"])
    return out


def upload(
    src: str,
    dst: str,
    *,
    threads: int = 8,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> UploadReport:
    """Copy every file below ``src`` to the same relative path below ``dst``.

    Raises:
        StorageError: a copy failed or a size differs after copying (a re-run resumes).
    """
    start = time.perf_counter()
    sources = _listing(src, storage_options)
    if not sources:
        raise StorageError(f"nothing to upload: {src} holds no files")
    existing = _listing(dst, storage_options)
    todo = sorted(rel for rel, size in sources.items() if existing.get(rel) != size)
    log.info(
        "Uploading %d of %d files from %s to %s (%d already there)",
        len(todo),
        len(sources),
        src,
        dst,
        len(sources) - len(todo),
    )
    src_fs, src_root = storage.url_to_fs(src, storage_options)

    def copy(rel: str) -> int:
        source = posixpath.join(src_root.rstrip("/"), rel)
        target = storage.join(dst, rel)
        with storage.atomic_path(target, storage_options) as (fs, tmp), src_fs.open(source, "rb") as fin:
            with fs.open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, CHUNK)
            size = fs.size(tmp)
            if size != sources[rel]:
                raise StorageError(f"size of {target} is {size} after copying, not {sources[rel]}: run again")
        return sources[rel]

    copied = 0
    done_bytes = 0
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="lastlayer-upload") as pool:
        for size in pool.map(copy, todo):
            copied += 1
            done_bytes += size
            if progress is not None:
                progress(copied, len(todo))
    after = _listing(dst, storage_options)
    wrong = [rel for rel, size in sources.items() if after.get(rel) != size]
    if wrong:
        raise StorageError(f"{len(wrong)} files differ at {dst} after uploading (e.g. {wrong[0]}): run again")
    seconds = time.perf_counter() - start
    return UploadReport(len(sources), copied, len(sources) - len(todo), done_bytes, seconds)
