"""Storage: every path is an fsspec URL (a plain path is a local file).

URLs and ``storage_options`` flow through to :func:`fsspec.core.url_to_fs`. Options may be grouped by
protocol, as fsspec does for chained URLs (``{"hdfs": {...}, "webhdfs": {...}}``): a URL gets the
ungrouped options and its own protocol's group, not the others', so one mapping serves every URL of a
run (e.g. :meth:`lastlayer.hadoop.HadoopLogin.storage_options` with local or ``http://`` paths). Writes that
matter go through :func:`write_atomic`: the bytes land under a temporary name in the target folder
and are renamed into place, so a reader never sees half a file (``fs.transaction`` gives no such
guarantee on HDFS).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import stat
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from lastlayer.errors import DataError, StorageError

log = logging.getLogger(__name__)

StorageOptions = Mapping[str, Any]

TEMP_PREFIX = "._lastlayer_tmp_"
#: Filesystems whose ``mv(..., overwrite=True)`` is one atomic rename that replaces the target.
ATOMIC_OVERWRITE_PROTOCOLS = frozenset({"hdfs", "viewfs"})


#: URL schemes that lastlayer's adapter of hdfs-native serves (:func:`lastlayer.hadoop.fs.register`).
HADOOP_PROTOCOLS = ("hdfs", "viewfs")


def url_to_fs(url: str, storage_options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem serving ``url`` and the path inside it, made with the options for ``url``
    (see :func:`options_for`); ``hdfs://`` and ``viewfs://`` through :mod:`lastlayer.hadoop.fs`."""
    if fsspec.core.split_protocol(url)[0] in HADOOP_PROTOCOLS:
        from lastlayer.hadoop import fs as hadoop_fs  # (hdfs-native loads only for these URLs)

        hadoop_fs.register()
    try:
        return fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"cannot open {url!r}: {exc}. Check the URL scheme and that its fsspec backend is installed."
        ) from exc


def options_for(url: str, storage_options: StorageOptions | None) -> dict[str, Any]:
    """The ungrouped options and those of ``url``'s protocol group (a key naming a protocol whose value
    is a mapping); other protocols' groups are left out. Chained URLs (``a::b://``) get everything:
    fsspec sorts the groups out along the chain."""
    options = dict(storage_options or {})
    if "::" in url:
        return options
    groups = {k for k, v in options.items() if isinstance(v, Mapping)}
    if not groups:
        return options
    groups &= set(fsspec.available_protocols())
    own = options.get(fsspec.core.split_protocol(url)[0] or "file")
    flat = {k: v for k, v in options.items() if k not in groups}
    return {**flat, **own} if isinstance(own, Mapping) else flat


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/``, keeping the scheme and host."""
    return posixpath.join(url.rstrip("/") if url not in ("/", "") else url, *parts)


_PERMISSION_RE = re.compile(
    r"Permission denied: user=[^,]+, access=\w+, inode=\"[^\"]*\"(:[\w.-]+){0,2}(:[-dwrxstST]+)?"
)
_KERBEROS_MARKERS = (
    "GSS_S_NO_CRED",
    "No Kerberos credentials",
    "GSSAPI",
    "SASL",
    "Client cannot authenticate",
)


#: Hadoop's InvalidToken text for a delegation token past its renewal time.
_TOKEN_EXPIRED = "Token has expired"


def describe(exc: BaseException, url: str, action: str) -> StorageError:
    """Turn an I/O exception from any backend into a one-line :class:`StorageError`.

    HDFS refusals become Hadoop's own ``Permission denied: user=..., access=..., inode=...`` text, and
    missing Kerberos credentials say how to get them.
    """
    if isinstance(exc, StorageError):
        return exc
    text = " ".join(str(exc).split())
    denied = _PERMISSION_RE.search(text)
    if denied:
        return StorageError(
            f"cannot {action} {url}: {denied.group(0)} (ask the owner for access, or use a "
            "path your user may write)"
        )
    if _TOKEN_EXPIRED in text:
        return StorageError(
            f"cannot {action} {url}: its HDFS delegation token has expired ({text[:200]}); the run "
            "outlasted the NameNode's dfs.namenode.delegation.token.renew-interval: raise it above the "
            "run's length (on YARN an executor's Python reads the token file of its container, which "
            "nobody renews once Spark has obtained newer tokens)"
        )
    if any(marker in text for marker in _KERBEROS_MARKERS):
        return StorageError(
            f"cannot {action} {url}: no valid Kerberos ticket ({text[:200]}); run kinit, or "
            "pass --principal and --keytab"
        )
    if isinstance(exc, FileNotFoundError):
        hint = "check that the path exists"
    elif isinstance(exc, PermissionError):
        hint = "check the permissions of the path and of the user you run as"
    else:
        hint = "check the URL, the service and your credentials"
    return StorageError(f"cannot {action} {url}: {exc.__class__.__name__}: {text[:500]} ({hint})")


#: Most bytes :func:`read_bytes` reads unless told otherwise (an ONNX model is at most 2 GiB).
MAX_READ_BYTES = 2 << 30
_CHUNK = 1 << 20


def read_bytes(
    url: str,
    storage_options: StorageOptions | None = None,
    max_bytes: int = MAX_READ_BYTES,
    what: str = "the file",
) -> bytes:
    """Read a whole regular file of at most ``max_bytes`` (see :func:`read_regular`).

    Raises:
        DataError: not a regular file, or larger than ``max_bytes``.
        StorageError: it cannot be read (missing, permission, storage down).
    """
    fs, path = url_to_fs(url, storage_options)
    try:
        return read_regular(fs, path, url, max_bytes, what)
    except DataError:
        raise
    except Exception as exc:
        raise describe(exc, url, "read") from exc


def read_regular(
    fs: AbstractFileSystem, path: str, url: str, max_bytes: int, what: str = "the file"
) -> bytes:
    """The bytes of the regular file ``path`` of ``fs`` (``url`` names it in messages), at most
    ``max_bytes``. A FIFO, a device, a socket or a folder is refused without reading it: a local file
    is opened non-blocking (a FIFO with no writer never hangs) and its type checked on the open file.

    Raises:
        DataError: not a regular file, or larger than ``max_bytes``.
        Exception: what the backend raises (``FileNotFoundError``, ...), unchanged.
    """
    if isinstance(fs, LocalFileSystem):
        return _read_local(path, url, max_bytes, what)
    info = fs.info(path)
    if info.get("type") != "file":
        raise not_regular(url, str(info.get("type")), what)
    if (info.get("size") or 0) > max_bytes:
        raise too_large(url, int(info["size"]), max_bytes, what)
    with fs.open(path, "rb") as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(url, len(data), max_bytes, what)
    return data


def require_regular(url: str, storage_options: StorageOptions | None = None, what: str = "the file") -> None:
    """Check that ``url`` is a regular file without opening it (a link is followed to see what it is).

    Raises:
        DataError: it is a folder, a FIFO, a device or a socket.
        StorageError: it cannot be looked up (missing, permission, storage down).
    """
    fs, path = url_to_fs(url, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):
            kind = _kind(os.stat(path).st_mode)
        else:
            kind = "" if fs.info(path).get("type") == "file" else "not a file"
    except Exception as exc:
        raise describe(exc, url, "read") from exc
    if kind:
        raise not_regular(url, kind, what)


def read_head(fs: AbstractFileSystem, path: str, url: str, size: int) -> bytes:
    """The first ``size`` bytes (or fewer) of the regular file ``path``.

    Raises:
        DataError: not a regular file.
        StorageError: it cannot be read.
    """
    try:
        if isinstance(fs, LocalFileSystem):
            return _read_local(path, url, size, "the file", head=True)
        if fs.info(path).get("type") != "file":
            raise not_regular(url, "not a file", "the file")
        with fs.open(path, "rb") as stream:
            return stream.read(size)
    except DataError:
        raise
    except Exception as exc:
        raise describe(exc, url, "read") from exc


@contextmanager
def open_regular(
    url: str,
    storage_options: StorageOptions | None = None,
    max_bytes: int = MAX_READ_BYTES,
    what: str = "the file",
) -> Iterator[io.BufferedReader]:
    """A binary stream of the regular file ``url`` read a piece at a time under :func:`read_regular`'s
    rules (a FIFO, device, socket or folder refused unopened); reading past ``max_bytes`` raises.

    Raises:
        DataError: not a regular file, or (while read) larger than ``max_bytes``.
        StorageError: it cannot be opened or read (missing, permission, storage down).
    """
    fs, path = url_to_fs(url, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):
            stream: Any = _open_local(path, url, what)
        else:
            info = fs.info(path)
            if info.get("type") != "file":
                raise not_regular(url, str(info.get("type")), what)
            if (info.get("size") or 0) > max_bytes:
                raise too_large(url, int(info["size"]), max_bytes, what)
            stream = fs.open(path, "rb")
    except DataError:
        raise
    except Exception as exc:
        raise describe(exc, url, "read") from exc
    with stream:
        yield io.BufferedReader(_Bounded(stream, url, max_bytes, what), _CHUNK)


class _Bounded(io.RawIOBase):
    """A stream that refuses to give more than ``max_bytes`` and turns backend errors into
    :class:`StorageError` (see :func:`open_regular`)."""

    def __init__(self, stream: Any, url: str, max_bytes: int, what: str) -> None:
        self.stream, self.url, self.max_bytes, self.what, self.total = stream, url, max_bytes, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self.stream.read(min(len(buffer), self.max_bytes + 1 - self.total))
        except Exception as exc:
            raise describe(exc, self.url, "read") from exc
        self.total += len(data)
        if self.total > self.max_bytes:
            raise too_large(self.url, self.total, self.max_bytes, self.what)
        buffer[: len(data)] = data
        return len(data)


def _open_local(path: str, url: str, what: str) -> io.BufferedReader:
    """The local regular file ``path``, opened non-blocking; anything else refused."""
    kind = _kind(os.stat(path).st_mode)  # refused before opening (a device is never opened) ...
    if kind:
        raise not_regular(url, kind, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    stream = os.fdopen(fd, "rb")
    kind = _kind(os.fstat(fd).st_mode)  # ... and checked again on what was opened
    if kind:
        stream.close()
        raise not_regular(url, kind, what)
    return stream


def _read_local(path: str, url: str, max_bytes: int, what: str, head: bool = False) -> bytes:
    with _open_local(path, url, what) as stream:
        chunks, total = [], 0
        while total <= max_bytes and (chunk := stream.read(min(_CHUNK, max_bytes + 1 - total))):
            chunks.append(chunk)
            total += len(chunk)
    if total > max_bytes and not head:
        raise too_large(url, total, max_bytes, what)
    return b"".join(chunks)[:max_bytes]


def _kind(mode: int) -> str:
    """What a file that is not regular is ("" for a regular file)."""
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a device")


def not_regular(url: str, kind: str, what: str) -> DataError:
    """The error for reading something that is not a regular file."""
    return DataError(f"{url}: {what} is {kind}, not a regular file; name a regular file")


def too_large(url: str, size: int, max_bytes: int, what: str) -> DataError:
    """The error for a file over its byte limit."""
    return DataError(
        f"{url}: {what} has at least {size:,} bytes, more than the {max_bytes:,} lastlayer reads; "
        "name the right file"
    )


def inside(url: str, root: str) -> bool:
    """Whether the local path ``url`` stays below the local folder ``root`` once links are resolved
    (always ``True`` for other filesystems, which have no links)."""
    if "://" in url and not url.startswith("file://"):
        return True
    real_root = os.path.realpath(root.removeprefix("file://"))
    real = os.path.realpath(url.removeprefix("file://"))
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether ``url`` names an existing file or folder."""
    fs, path = url_to_fs(url, storage_options)
    try:
        return bool(fs.exists(path))
    except Exception as exc:
        raise describe(exc, url, "look up") from exc


def _publish(fs: AbstractFileSystem, tmp: str, path: str) -> None:
    """Rename ``tmp`` onto ``path``, replacing an existing file."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ATOMIC_OVERWRITE_PROTOCOLS:
        fs.mv(tmp, path, overwrite=True)
        return
    if protocol not in ("file", "local") and fs.exists(path):
        fs.rm_file(path)  # rename does not replace here: a reader may briefly find no file, never half a file
    fs.mv(tmp, path)


def file_problem(url: str, storage_options: StorageOptions | None = None) -> str | None:
    """Why ``url`` cannot be written as a file, as far as can be told without writing: it is an
    existing folder, or the nearest existing folder above it is a file. ``None`` when it looks fine.

    Raises:
        StorageError: the storage cannot be asked.
    """
    fs, path = url_to_fs(url, storage_options)
    try:
        if fs.isdir(path):
            return "is an existing folder; name a file in it"
        parent = posixpath.dirname(path.rstrip("/"))
        while parent and parent != "/" and not fs.exists(parent):
            parent = posixpath.dirname(parent)
        if parent and not fs.isdir(parent):
            return f"its folder {parent} is a file; name a path under a folder"
    except Exception as exc:
        raise describe(exc, url, "look up") from exc
    return None


def rename(source: str, target: str, storage_options: StorageOptions | None = None) -> None:
    """Rename the file ``source`` onto ``target`` (same filesystem), replacing an existing file."""
    fs, path = url_to_fs(source, storage_options)
    try:
        _publish(fs, path, url_to_fs(target, storage_options)[1])
    except Exception as exc:
        raise describe(exc, source, f"move into place as {target}") from exc


@contextmanager
def atomic_path(
    url: str, storage_options: StorageOptions | None = None
) -> Iterator[tuple[AbstractFileSystem, str]]:
    """Yield ``(fs, temp_path)`` to write; on success rename it to ``url``, on failure remove it."""
    fs, path = url_to_fs(url, storage_options)
    if fs.isdir(path):  # a rename would put the file inside it
        raise StorageError(f"cannot write {url}: it is an existing folder; name a file in it")
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex}_{name}")
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        yield fs, tmp
        _publish(fs, tmp, path)
    except BaseException as exc:
        try:
            if fs.exists(tmp):
                fs.rm_file(tmp)
        except Exception:  # the original error matters more than the clean-up
            log.warning("could not remove the temporary file %s", tmp)
        if isinstance(exc, Exception):
            raise describe(exc, url, "write") from exc
        raise


def write_atomic(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``url`` through a temporary name and a rename."""
    with atomic_path(url, storage_options) as (fs, tmp):
        fs.pipe_file(tmp, data)


#: The temporary names :func:`write_private` writes through (a listing of the folder may hide them).
PRIVATE_TEMP_PREFIX = ".tmp-secret-"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable and writable by its owner only (0600), through a temporary
    name and a rename, so no reader sees a partial file or a moment of wider permissions."""
    fd, tmp = tempfile.mkstemp(prefix=PRIVATE_TEMP_PREFIX, dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
