"""Uploads: copy a local image folder to ``hdfs://`` (or any fsspec URL) with many files in flight,
resumably.

A file is copied to a temporary name and renamed, so a destination file is either complete or
absent; a re-run skips every destination file whose size already matches and copies the rest.
Each file's size is checked at the destination before its rename, and every file's after the copy.

Small files are bound by latency, not bandwidth: on HDFS each one costs a create, a block
pipeline and a close that waits for the NameNode to see the block (~0.1-0.5 s), whatever its size.
So many files are in flight at once: without ``threads``, :class:`Window` starts with
:data:`START_IN_FLIGHT` and doubles the number while the measured rate of finished files keeps
rising (by Little's law, while the latency does not grow as fast as the files in flight), up to
:data:`MOST_IN_FLIGHT`, and backs off a doubling that did not pay. Each file in flight is a
thread's: on ``hdfs://`` and ``viewfs://`` it calls hdfs-native's client directly (create, write,
close, size, rename: no other round trip), which releases the GIL while it waits; other storage goes
through fsspec. (hdfs-native's asynchronous client was tried first: under load, an upload through it
stalled for minutes, a Python thread and a tokio thread each waiting for the other.) File data is
read :data:`CHUNK` bytes at a time, so at most ``MOST_IN_FLIGHT x CHUNK`` bytes (64 MiB) of it are
held at once, plus, on storage other than HDFS, the write buffer fsspec's backend keeps per open file.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from hdfs_native import Client, WriteOptions

from lastlayer import storage
from lastlayer.errors import StorageError

log = logging.getLogger(__name__)

#: Bytes of a file read and written at a time.
CHUNK = 256 << 10
#: Files in flight when the number adapts: at the start, and at most.
START_IN_FLIGHT, MOST_IN_FLIGHT = 8, 256
#: A doubling of the files in flight is kept when the rate rises by at least this factor.
GAIN = 1.15
#: Shortest measurement of the rate at one number of files in flight, seconds.
MEASURE_SECONDS = 0.5
#: Phases at one number of files in flight before doubling it is tried again.
HOLD_PHASES = 4
#: Longest wait for the next file to finish, seconds.
STALL_SECONDS = 300.0


@dataclass(frozen=True)
class UploadReport:
    """What an upload did.

    Attributes:
        files: files in the source folder.
        copied: files copied in this run.
        skipped: files already complete at the destination.
        bytes_copied: bytes copied in this run.
        seconds: wall time.
        in_flight: the most files that were in flight at once.
    """

    files: int
    copied: int
    skipped: int
    bytes_copied: int
    seconds: float
    in_flight: int = 0


class Window:
    """How many files may be in flight: a fixed number, or one that adapts to the storage.

    Adapting, it measures the rate of finished files in phases of at least twice the files in flight
    and :data:`MEASURE_SECONDS`. It doubles the number while each doubling raises the rate by
    :data:`GAIN`, and halves it back after a doubling that did not; then it holds, and after
    :data:`HOLD_PHASES` phases tries doubling again, so that one unlucky measurement on a busy
    machine does not fix the number for the rest of the upload.

    Attributes:
        limit: files that may be in flight now.
        adapting: whether the limit may change.
    """

    def __init__(self, fixed: int = 0, start: int = START_IN_FLIGHT, most: int = MOST_IN_FLIGHT) -> None:
        self.limit = fixed or start
        self.adapting = not fixed
        self.least, self.most = start, most
        self._rate: float | None = None  # of the last phase, files/s
        self._climbed = False  # whether the last change doubled the limit
        self._held = 0  # phases since the last change
        self._since: float | None = None
        self._finished = 0

    def finished(self, now: float) -> None:
        """Record that a file finished at ``now`` (seconds, monotonic) and adapt the limit."""
        if not self.adapting:
            return
        if self._since is None:
            self._since = now
            return
        self._finished += 1
        elapsed = now - self._since
        if self._finished < 2 * self.limit or elapsed < MEASURE_SECONDS:
            return
        rate = self._finished / elapsed
        self._since, self._finished = now, 0
        previous, self._rate = self._rate, rate
        if previous is not None and self._climbed and rate < previous * GAIN:
            self._change(self.limit // 2, climb=False)  # the doubling did not pay: undo it
        elif previous is None or self._climbed or self._held >= HOLD_PHASES:
            self._change(self.limit * 2, climb=True)
        else:
            self._held += 1

    def _change(self, limit: int, climb: bool) -> None:
        limit = max(self.least, min(self.most, limit))
        if limit != self.limit:
            log.debug("upload: %d files in flight (was %d, %.0f files/s)", limit, self.limit, self._rate)
        self._climbed = climb and limit > self.limit
        self._held = 0
        self.limit = limit


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
    threads: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> UploadReport:
    """Copy every file below ``src`` to the same relative path below ``dst``.

    Args:
        threads: files in flight at once; 0 adapts the number to the storage (see the module doc).

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
    copier = _Copier(src, dst, sources, storage_options)
    copier.folders(todo)
    copied, in_flight = _schedule(todo, copier.copy, Window(threads), progress)
    after = _listing(dst, storage_options)
    wrong = [rel for rel, size in sources.items() if after.get(rel) != size]
    if wrong:
        raise StorageError(f"{len(wrong)} files differ at {dst} after uploading (e.g. {wrong[0]}): run again")
    seconds = time.perf_counter() - start
    done_bytes = sum(sources[rel] for rel in todo)
    return UploadReport(len(sources), copied, len(sources) - len(todo), done_bytes, seconds, in_flight)


class _Copier:
    """Copies files from a local (or fsspec) folder to a destination folder, one file a call."""

    def __init__(
        self, src: str, dst: str, sizes: Mapping[str, int], storage_options: Mapping[str, Any] | None
    ) -> None:
        self.src_fs, root = storage.url_to_fs(src, storage_options)
        self.src_root = root.rstrip("/")
        self.dst = dst
        self.dst_fs, dst_root = storage.url_to_fs(dst, storage_options)
        self.dst_root = dst_root.rstrip("/")
        self.sizes = sizes
        self.storage_options = storage_options
        self.native = isinstance(getattr(self.dst_fs, "client", None), Client)  # hdfs://, viewfs://

    def folders(self, todo: Iterable[str]) -> None:
        """Make every destination folder of ``todo`` once, before the files."""
        for folder in sorted({posixpath.dirname(posixpath.join(self.dst_root, rel)) for rel in todo}):
            try:
                self.dst_fs.makedirs(folder, exist_ok=True)
            except Exception as exc:
                raise storage.describe(exc, self.dst, "write") from exc

    def copy(self, rel: str) -> int:
        """Copy one file (in a worker thread); return its size."""
        return self._native(rel) if self.native else self._with_fsspec(rel)

    def _chunks(self, rel: str) -> Iterator[bytes]:
        with self.src_fs.open(posixpath.join(self.src_root, rel), "rb") as fin:
            while chunk := fin.read(CHUNK):
                yield chunk

    def _native(self, rel: str) -> int:
        """Copy one file with hdfs-native's client: write a temporary file, check its size, rename it
        over the target (HDFS's rename with overwrite is atomic)."""
        client = self.dst_fs.client
        target = posixpath.join(self.dst_root, rel)
        folder, name = posixpath.split(target)
        tmp = posixpath.join(folder, f"{storage.TEMP_PREFIX}{uuid.uuid4().hex}_{name}")
        size = self.sizes[rel]
        try:
            with client.create(tmp, WriteOptions(overwrite=False)) as writer:
                for chunk in self._chunks(rel):
                    writer.write(chunk)
            written = client.get_file_info(tmp).length
            if written != size:
                raise StorageError(f"size of {self.dst}/{rel} is {written} after copying, not {size}")
            client.rename(tmp, target, overwrite=True)
        except BaseException as exc:
            try:
                client.delete(tmp)
            except Exception:  # the copy's own error is the one to report; a re-run ignores the file
                log.debug("could not remove the temporary file %s", tmp)
            if isinstance(exc, Exception):
                raise storage.describe(exc, f"{self.dst}/{rel}", "write") from exc
            raise
        return size

    def _with_fsspec(self, rel: str) -> int:
        """Copy one file through fsspec (any storage)."""
        target = storage.join(self.dst, rel)
        with storage.atomic_path(target, self.storage_options) as (fs, tmp):
            with fs.open(tmp, "wb") as fout:
                for chunk in self._chunks(rel):
                    fout.write(chunk)
            size = fs.size(tmp)
            if size != self.sizes[rel]:
                raise StorageError(f"size of {target} is {size} after copying, not {self.sizes[rel]}")
        return self.sizes[rel]


def _schedule(
    todo: list[str],
    copy: Callable[[str], int],
    window: Window,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Keep up to ``window.limit`` copies in flight, each in a thread, until ``todo`` is done or one
    fails; return the files copied and the most in flight at once.

    Raises:
        StorageError: the first failure (after the copies in flight have finished), or no file
            finished for :data:`STALL_SECONDS`.
    """
    names = iter(todo)
    pending: set[Future[int]] = set()
    copied = peak = 0
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(window.most if window.adapting else window.limit, "lastlayer-upload")
    try:
        while True:
            while failure is None and len(pending) < window.limit and (rel := next(names, None)) is not None:
                pending.add(pool.submit(copy, rel))
            peak = max(peak, len(pending))
            if not pending:
                break
            done, pending = wait(pending, STALL_SECONDS, FIRST_COMPLETED)
            if not done:
                failure = StorageError(f"no file finished in {STALL_SECONDS:.0f} s: the storage stalls")
                break
            for future in done:
                if (error := future.exception()) is not None:
                    failure = failure or error
                    continue
                copied += 1
                window.finished(time.monotonic())
                if progress is not None:
                    progress(copied, len(todo))
    finally:  # nothing left in flight, unless the storage stalled or the caller was interrupted
        pool.shutdown(wait=not pending, cancel_futures=True)
    if failure is not None:
        raise failure if isinstance(failure, StorageError) else StorageError(f"upload failed: {failure}")
    return copied, peak
