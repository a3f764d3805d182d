"""What keeps ``lastlayer serve`` up under hostile clients, besides the per-request bounds of
:mod:`lastlayer.serve.app`.

- :func:`protocol`: uvicorn's HTTP protocol with a deadline on each request head (uvicorn 0.55 has
  none: a connection that never finishes its headers stays open for ever and counts against
  ``limit_concurrency``);
- :class:`HostCheck`: the ``Host`` header must name this server (DNS rebinding);
- :class:`DecodeBudget`: the pixels being decoded at once, across requests;
- :func:`give_back_memory`: returns freed heap to the system after a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import json
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

#: Host names a server on any address answers to.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing a connection whose request head (the first, or the
    next one on a kept-alive connection) is not complete ``header_timeout`` seconds after the
    connection opened or the previous response ended. Written here because uvicorn has no such
    setting (its ``timeout_keep_alive`` stops counting at the first byte of the next request)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._start_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._start_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _start_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def _head_late(self) -> None:
            cycle = getattr(self, "cycle", None)
            waiting_for_head = cycle is None or cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


class HostCheck:
    """ASGI middleware: a request whose ``Host`` header names none of ``names`` (port ignored) gets
    a JSON 400, so that a web page whose name was rebound to 127.0.0.1 cannot use the server."""

    def __init__(self, app: ASGIApp, names: Iterable[str]) -> None:
        self.app = app
        self.names = {n.strip().lower().strip("[]") for n in names}

    def allows(self, host: str) -> bool:
        """Whether the ``Host`` header value ``host`` names this server."""
        if "*" in self.names:
            return True
        name = host.strip().lower()
        if name.startswith("["):  # [v6]:port
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":")[0]
        return name in self.names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if self.allows(host):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": f"Host {host[:100]!r} is not a name of this server; start it with "
                "--allowed_host=NAME to accept that name"
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Exhausted(Exception):
    """The decode budget has no room for an image (an HTTP 503 with this reason)."""


class DecodeBudget:
    """The pixels of the images being decoded at once, at most ``limit`` (one event loop: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def taken(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget while the block runs.

        Raises:
            Exhausted: they do not fit beside those held.
        """
        if self.used + pixels > self.limit:
            raise Exhausted(
                f"{self.used:,} px are being decoded and this image has {pixels:,}, more than "
                f"--max_decode_pixels={self.limit:,} allows at once"
            )
        self.used += pixels
        try:
            yield
        finally:
            self.used -= pixels


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def give_back_memory() -> bool:
    """Return the heap that decoded images freed to the system (glibc's ``malloc_trim``: freed
    memory otherwise stays with the process after a burst); ``False`` where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
