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

import logging
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from lastlayer.errors import StorageError

log = logging.getLogger(__name__)

StorageOptions = Mapping[str, Any]

TEMP_PREFIX = "._lastlayer_tmp_"
#: Filesystems whose ``mv(..., overwrite=True)`` is one atomic rename that replaces the target.
ATOMIC_OVERWRITE_PROTOCOLS = frozenset({"hdfs", "viewfs"})


def url_to_fs(url: str, storage_options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem serving ``url`` and the path inside it, made with the options for ``url``
    (see :func:`options_for`)."""
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


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    """Read a whole file."""
    fs, path = url_to_fs(url, storage_options)
    try:
        return fs.cat_file(path)
    except Exception as exc:
        raise describe(exc, url, "read") from exc


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
