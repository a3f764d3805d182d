"""One bounded download: the bytes at a URL, at most so many, within so many seconds in all.

``http(s)://`` is read with urllib (``user:token@host`` becomes HTTP basic auth and is masked in
every message); every other URL or plain path through :mod:`lastlayer.storage`, streamed, so a
device, a FIFO or a huge file is stopped at the same bounds. Both limits are settings the user can
change, and every message that names a limit names its setting.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lastlayer import storage
from lastlayer.errors import DataError, LastlayerError, StorageError, UsageError
from lastlayer.storage import StorageOptions

_CHUNK = 1 << 20
#: Longest wait for any one network read; the whole download is bounded by ``Limits.seconds``.
READ_TIMEOUT_S = 60.0


class Closable(Protocol):
    """What is closed when a download is given up (an HTTP response)."""

    def close(self) -> None: ...


class Readable(Protocol):
    """A binary stream read in chunks."""

    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """Where downloaded bytes go."""

    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True)
class Limits:
    """How much a download may bring and how long it may take.

    Attributes:
        max_bytes: most bytes accepted.
        seconds: most wall time for the whole download (connecting, redirects and reading).
        bytes_setting, seconds_setting: the settings that change them, named in messages
            (e.g. ``--max_archive_bytes``, ``service.job_timeout``).
    """

    max_bytes: int
    seconds: float
    bytes_setting: str = "max_bytes"
    seconds_setting: str = "timeout"

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise UsageError(f"{self.bytes_setting} must be positive, got {self.max_bytes}")
        if not self.seconds > 0 or self.seconds == float("inf"):
            raise UsageError(
                f"{self.seconds_setting} must be a positive number of seconds, got {self.seconds}"
            )


def shown(url: str) -> str:
    """``url`` without a password or token in its user part."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def one_line(value: object) -> str:
    """``value`` as text on one line, at most 300 characters."""
    return " ".join(str(value).split())[:300]


def fetch(
    url: str, limits: Limits, *, storage_options: StorageOptions | None = None, what: str = "the file"
) -> bytes:
    """The bytes at ``url``, within ``limits``.

    Args:
        what: how messages call the content (``the archive``, ``core-site.xml``).

    Raises:
        StorageError: unreachable, refused, missing or too slow (one line, naming the time setting).
        DataError: larger than ``limits.max_bytes`` (naming the size setting).
    """
    sink = io.BytesIO()
    fetch_into(sink, url, limits, storage_options=storage_options, what=what)
    return sink.getvalue()


def fetch_into(
    sink: Writable,
    url: str,
    limits: Limits,
    *,
    storage_options: StorageOptions | None = None,
    what: str = "the file",
) -> int:
    """Write the bytes at ``url`` to ``sink`` (e.g. a file, so that memory stays small), within
    ``limits``; returns how many. Raises as :func:`fetch` (``sink`` may then hold a part)."""
    if url.lower().startswith(("http://", "https://")):
        return _bounded(
            url, limits, lambda deadline, opened: _http_read(url, limits, what, deadline, opened, sink)
        )
    return _bounded(
        url,
        limits,
        lambda deadline, opened: _storage_read(url, limits, what, deadline, opened, sink, storage_options),
    )


def too_big(url: str, size: int, limits: Limits, what: str) -> DataError:
    """The error for content over ``limits.max_bytes``."""
    return DataError(
        f"{shown(url)}: {what} is over {size:,} bytes, more than the {limits.max_bytes:,} allowed; "
        f"raise {limits.bytes_setting} if you trust it"
    )


def _timed_out(url: str, limits: Limits) -> StorageError:
    return StorageError(
        f"cannot download {shown(url)}: no answer within {round(limits.seconds, 1):g} s (check that the "
        f"server is up and reachable from this machine, or allow a longer {limits.seconds_setting})"
    )


def _request(url: str) -> urllib.request.Request:
    headers = {"User-Agent": "lastlayer"}
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:  # user:token@host as HTTP basic auth
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return urllib.request.Request(url, headers=headers)


def _bounded(url: str, limits: Limits, read: Callable[[float, list[Closable]], int]) -> int:
    """``read(deadline, opened)`` in a daemon thread, waited for at most ``limits.seconds``: a read's
    own timeout bounds each read, not the whole transfer, so a server trickling bytes (or a FIFO, or a
    hung file system) could hold it for ever. ``opened`` collects what to close on giving up."""
    deadline = time.monotonic() + limits.seconds
    outcome: dict[str, object] = {}
    finished = threading.Event()
    opened: list[Closable] = []

    def download() -> None:
        try:
            outcome["size"] = read(deadline, opened)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=download, name="lastlayer-fetch", daemon=True).start()
    if not finished.wait(limits.seconds):
        for handle in opened:
            with contextlib.suppress(Exception):
                handle.close()  # the reader gives up at its next read
        raise _timed_out(url, limits)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["size"]  # type: ignore[return-value]


def _copy_bounded(
    stream: Readable, sink: Writable, url: str, limits: Limits, what: str, deadline: float
) -> int:
    """Copy every byte of ``stream`` to ``sink``, refusing more than ``limits.max_bytes`` or reading
    past ``deadline``; returns how many."""
    read = getattr(stream, "read1", stream.read)  # read1: what has arrived, without waiting for more
    total = 0
    while chunk := read(_CHUNK):
        total += len(chunk)
        if total > limits.max_bytes:
            raise too_big(url, total, limits, what)
        if time.monotonic() > deadline:
            raise _timed_out(url, limits)
        sink.write(chunk)
    return total


def _storage_read(
    url: str,
    limits: Limits,
    what: str,
    deadline: float,
    opened: list[Closable],
    sink: Writable,
    storage_options: StorageOptions | None,
) -> int:
    fs, path = storage.url_to_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as stream:
            opened.append(stream)
            return _copy_bounded(stream, sink, url, limits, what, deadline)
    except LastlayerError:
        raise
    except Exception as exc:
        raise storage.describe(exc, url, "read") from exc


def _http_read(
    url: str, limits: Limits, what: str, deadline: float, opened: list[Closable], sink: Writable
) -> int:
    try:
        timeout = max(0.1, min(READ_TIMEOUT_S, deadline - time.monotonic()))
        with urllib.request.urlopen(_request(url), timeout=timeout) as response:
            opened.append(response)
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise too_big(url, int(declared), limits, what)
            return _copy_bounded(response, sink, url, limits, what, deadline)
    except urllib.error.HTTPError as exc:
        raise StorageError(
            f"cannot download {shown(url)}: HTTP {exc.code} {one_line(exc.reason)} (check the URL and "
            "that the server lets this machine read it)"
        ) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _timed_out(url, limits) from None
        raise StorageError(
            f"cannot download {shown(url)}: {one_line(exc.reason)} (check the URL and that the server "
            "is reachable from this machine)"
        ) from None
    except TimeoutError:
        raise _timed_out(url, limits) from None
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise StorageError(
            f"cannot download {shown(url)}: {exc.__class__.__name__}: {one_line(exc)} (try again; check "
            "the server and the network)"
        ) from None
