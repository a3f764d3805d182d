"""One bounded download: total bytes and total wall time, whatever the server does."""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from helpers import serve_http
from lastlayer.errors import DataError, StorageError, UsageError
from lastlayer.fetch import Limits, fetch, shown

LIMITS = Limits(1000, 5.0, "--max_download_bytes", "--download_timeout")


class Handler(http.server.BaseHTTPRequestHandler):
    seen_auth: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        Handler.seen_auth.append(self.headers.get("Authorization", ""))
        if self.path == "/trickle":  # one byte every 0.3 s, for ever
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(200):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.3)
            return
        if self.path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"x" * 5000)
            return
        if self.path == "/undeclared-big":  # no Content-Length: the count while reading must stop it
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"x" * 5000)
            return
        if self.path == "/missing":
            self.send_error(404, "Not Found")
            return
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_http(Handler) as url:
        yield url.removeprefix("http://")


def test_a_trickling_server_is_cut_off_at_the_total_time(server):
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        fetch(f"http://{server}/trickle", Limits(1000, 1.5, "--max_download_bytes", "--download_timeout"))
    assert time.monotonic() - start < 4.0  # bounded: the 200 bytes would take 60 s
    assert str(info.value) == (
        f"cannot download http://{server}/trickle: no answer within 1.5 s (check that the server is up "
        "and reachable from this machine, or allow a longer --download_timeout)"
    )


@pytest.mark.parametrize("path", ["/declared-big", "/undeclared-big"])
def test_more_bytes_than_allowed_is_refused_naming_the_setting(server, path):
    with pytest.raises(
        DataError,
        match=r"the file is over [\d,]+ bytes, more than the 1,000 allowed; raise --max_download_bytes",
    ):
        fetch(f"http://{server}{path}", LIMITS)


def test_credentials_in_the_url_become_basic_auth_and_never_appear_in_messages(server):
    assert fetch(f"http://user:s3cret@{server}/ok", LIMITS) == b"hello"
    assert Handler.seen_auth[-1] == "Basic " + base64.b64encode(b"user:s3cret").decode()
    with pytest.raises(DataError) as info:
        fetch(f"http://user:s3cret@{server}/declared-big", LIMITS, what="the archive")
    assert "s3cret" not in str(info.value) and str(info.value).startswith(f"http://***@{server}/declared-big")
    assert shown("http://u:p@h/x") == "http://***@h/x" and shown("/plain/path") == "/plain/path"


def test_paths_and_storage_urls_are_bounded_too(tmp_path):
    (tmp_path / "small").write_bytes(b"abc")
    (tmp_path / "big").write_bytes(b"x" * 2000)
    assert fetch(str(tmp_path / "small"), LIMITS) == b"abc"
    with pytest.raises(DataError, match="more than the 1,000 allowed"):
        fetch(f"file://{tmp_path / 'big'}", LIMITS)
    with pytest.raises(StorageError, match="check that the path exists"):
        fetch(str(tmp_path / "missing"), LIMITS)


def test_unreachable_and_refused(server):
    with pytest.raises(StorageError, match=r"HTTP 404 Not Found \(check the URL"):
        fetch(f"http://{server}/missing", LIMITS)
    with pytest.raises(StorageError, match=r"cannot download http://127\.0\.0\.1:1/x: .*reachable"):
        fetch("http://127.0.0.1:1/x", LIMITS)


def test_limits_must_be_positive_and_finite():
    with pytest.raises(UsageError, match="--max_download_bytes must be positive, got 0"):
        Limits(0, 1.0, "--max_download_bytes")
    with pytest.raises(UsageError, match="--download_timeout must be a positive number of seconds"):
        Limits(1, float("inf"), seconds_setting="--download_timeout")


@contextlib.contextmanager
def memory_ceiling(extra: int) -> Iterator[None]:
    """At most ``extra`` more bytes of address space for this process while the block runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    used = int(next(ln for ln in status.splitlines() if ln.startswith("VmSize:")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_device_or_a_fifo_is_bounded_like_a_server(tmp_path):
    """Paths are read streamed: /dev/zero stops at the byte bound, a FIFO nobody writes to at the time
    bound."""
    with memory_ceiling(1 << 30), pytest.raises(DataError, match="more than the 1,000 allowed"):
        fetch("/dev/zero", LIMITS)  # a regression reading it whole fails here, not the machine
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Timer(3.0, lambda: os.close(os.open(fifo, os.O_WRONLY)))  # then the reader ends
    writer.start()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"no answer within 1 s .*allow a longer --download_timeout"):
        fetch(str(fifo), Limits(1000, 1.0, "--max_download_bytes", "--download_timeout"))
    assert time.monotonic() - started < 2.5
    writer.join(timeout=10)
