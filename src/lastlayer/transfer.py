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
:data:`MOST_IN_FLIGHT`. ``hdfs://`` and ``viewfs://`` destinations go through hdfs-native's
asynchronous client (one event loop, no thread per file); other storage through a thread per file
in flight. File data is read :data:`CHUNK` bytes at a time, so at most ``MOST_IN_FLIGHT x CHUNK``
bytes are held at once.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lastlayer import storage
from lastlayer.errors import StorageError
from lastlayer.hadoop.fs import HdfsFileSystem  # registers the hdfs:// adapter, which has async_client()

log = logging.getLogger(__name__)

#: Bytes of a file read and written at a time.
CHUNK = 256 << 10
#: Files in flight when the number adapts: at the start, and at most.
START_IN_FLIGHT, MOST_IN_FLIGHT = 8, 256
#: A doubling of the files in flight is kept when the rate rises by at least this factor.
GAIN = 1.15
#: Shortest measurement of the rate at one number of files in flight, seconds.
MEASURE_SECONDS = 0.5
#: Longest time one file may take: this much, plus its size at 1 MB/s.
FILE_SECONDS = 300.0


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

    Adapting, it measures the rate of finished files over at least twice the files in flight and
    :data:`MEASURE_SECONDS`, and doubles the number while each doubling raises the rate by
    :data:`GAIN`; the first doubling that does not is undone, and the number stays.

    Attributes:
        limit: files that may be in flight now.
        adapting: whether the limit may still change.
    """

    def __init__(self, fixed: int = 0, start: int = START_IN_FLIGHT, most: int = MOST_IN_FLIGHT) -> None:
        self.limit = fixed or start
        self.adapting = not fixed
        self.most = most
        self._best = (0.0, self.limit)  # (rate, limit)
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
        best_rate = self._best[0]
        if rate >= best_rate * GAIN and self.limit < self.most:
            self._best = (rate, self.limit)
            self.limit = min(self.most, 2 * self.limit)
        else:  # the last doubling bought less than GAIN (or no more may be tried): undo it
            if rate > best_rate * GAIN:
                self._best = (rate, self.limit)
            self.limit = self._best[1]
            self.adapting = False
            log.debug("upload: %d files in flight (%.0f files/s measured)", self.limit, self._best[0])
        self._since, self._finished = now, 0


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
    copied, in_flight = _run_loop(copier.run(todo, Window(threads), progress))
    after = _listing(dst, storage_options)
    wrong = [rel for rel, size in sources.items() if after.get(rel) != size]
    if wrong:
        raise StorageError(f"{len(wrong)} files differ at {dst} after uploading (e.g. {wrong[0]}): run again")
    seconds = time.perf_counter() - start
    done_bytes = sum(sources[rel] for rel in todo)
    return UploadReport(len(sources), copied, len(sources) - len(todo), done_bytes, seconds, in_flight)


def _run_loop(work: Awaitable[tuple[int, int]]) -> tuple[int, int]:
    """Run ``work`` on an event loop of its own (in a thread when the caller already runs one, as
    a notebook does)."""

    async def main() -> tuple[int, int]:
        return await work

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with ThreadPoolExecutor(1, thread_name_prefix="lastlayer-upload-loop") as pool:
        return pool.submit(asyncio.run, main()).result()


class _Copier:
    """Copies files from a local (or fsspec) folder to a destination folder, many at once."""

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
        self.native = isinstance(self.dst_fs, HdfsFileSystem)

    async def run(
        self, todo: list[str], window: Window, progress: Callable[[int, int], None] | None
    ) -> tuple[int, int]:
        """Copy ``todo`` with at most ``window.limit`` files in flight; return the files copied and
        the most that were in flight at once.

        Raises:
            StorageError: the first failure, once the files in flight have finished.
        """
        if self.native:
            client = self.dst_fs.async_client()
            await self._folders(todo, lambda path: client.mkdirs(path, create_parent=True))
            return await _schedule(todo, lambda rel: self._native(client, rel), window, progress)
        with ThreadPoolExecutor(window.most if window.adapting else window.limit) as pool:
            loop = asyncio.get_running_loop()
            return await _schedule(
                todo, lambda rel: loop.run_in_executor(pool, self._with_fsspec, rel), window, progress
            )

    async def _folders(self, todo: Iterable[str], mkdirs: Callable[[str], Awaitable[Any]]) -> None:
        """Make every destination folder of ``todo`` once, all at the same time."""
        folders = {posixpath.dirname(posixpath.join(self.dst_root, rel)) for rel in todo}
        try:
            await asyncio.gather(*(mkdirs(folder) for folder in sorted(folders)))
        except Exception as exc:
            raise storage.describe(exc, self.dst, "write") from exc

    def _chunks(self, rel: str) -> Iterable[bytes]:
        with self.src_fs.open(posixpath.join(self.src_root, rel), "rb") as fin:
            while chunk := fin.read(CHUNK):
                yield chunk

    async def _native(self, client: Any, rel: str) -> int:
        """Copy one file with hdfs-native's asynchronous client: write a temporary file, check its
        size, rename it over the target (HDFS's rename with overwrite is atomic)."""
        from hdfs_native import WriteOptions

        target = posixpath.join(self.dst_root, rel)
        folder, name = posixpath.split(target)
        tmp = posixpath.join(folder, f"{storage.TEMP_PREFIX}{uuid.uuid4().hex}_{name}")
        size = self.sizes[rel]
        try:
            async with asyncio.timeout(FILE_SECONDS + size / 1e6):
                writer = await client.create(tmp, WriteOptions(overwrite=False))
                try:
                    for chunk in self._chunks(rel):  # local reads of CHUNK bytes are quick
                        await writer.write(chunk)
                finally:
                    await writer.close()
                written = (await client.get_file_info(tmp)).length
                if written != size:
                    raise StorageError(f"size of {self.dst}/{rel} is {written} after copying, not {size}")
                await client.rename(tmp, target, overwrite=True)
        except BaseException as exc:
            await _forget(client, tmp)
            if isinstance(exc, Exception):
                raise storage.describe(exc, f"{self.dst}/{rel}", "write") from exc
            raise
        return size

    def _with_fsspec(self, rel: str) -> int:
        """Copy one file through fsspec (any storage), in a worker thread."""
        target = storage.join(self.dst, rel)
        with storage.atomic_path(target, self.storage_options) as (fs, tmp):
            with fs.open(tmp, "wb") as fout:
                for chunk in self._chunks(rel):
                    fout.write(chunk)
            size = fs.size(tmp)
            if size != self.sizes[rel]:
                raise StorageError(f"size of {target} is {size} after copying, not {self.sizes[rel]}")
        return self.sizes[rel]


async def _forget(client: Any, tmp: str) -> None:
    """Remove a temporary file after a failure (best effort: a re-run ignores it anyway)."""
    try:
        async with asyncio.timeout(30):
            await client.delete(tmp)
    except Exception:  # the copy's own error is the one to report
        log.debug("could not remove the temporary file %s", tmp)


async def _schedule(
    todo: list[str],
    copy: Callable[[str], Awaitable[int]],
    window: Window,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Keep up to ``window.limit`` copies in flight until ``todo`` is done or one fails; return the
    files copied and the most in flight at once.

    Raises:
        StorageError: the first failure, after the copies in flight have finished.
    """
    names = iter(todo)
    pending: set[asyncio.Future[int]] = set()
    copied = peak = 0
    failure: BaseException | None = None
    while True:
        while failure is None and len(pending) < window.limit and (rel := next(names, None)) is not None:
            pending.add(asyncio.ensure_future(copy(rel)))
        peak = max(peak, len(pending))
        if not pending:
            break
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            if future.exception() is not None:
                failure = failure or future.exception()
                continue
            copied += 1
            window.finished(time.monotonic())
            if progress is not None:
                progress(copied, len(todo))
    if failure is not None:
        raise failure if isinstance(failure, StorageError) else StorageError(f"upload failed: {failure}")
    return copied, peak
