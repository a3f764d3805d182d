"""``lastlayer serve``: retrained models behind HTTP.

Starlette on uvicorn (the ``serve`` extra). Each model answers the Open Inference Protocol (KServe
v2: ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/NAME``, ``/v2/models/NAME/infer``) and
``POST /v1/models/NAME:classify`` (image bytes in, top-k labels out); ``/`` is a page where a person
drops an image and sees its labels. Images of concurrent requests share network calls
(:mod:`lastlayer.serve.batcher`). See :mod:`lastlayer.serve.app` for the routes.
"""

from __future__ import annotations

import importlib.util
import logging
import posixpath
import re
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lastlayer.errors import UsageError
from lastlayer.model.inference import RetrainedModel
from lastlayer.settings.options import ServeOptions

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

#: What serving needs beyond lastlayer's own dependencies (the ``serve`` extra).
LIBRARIES = ("starlette", "uvicorn")
#: Seconds uvicorn waits for open requests when asked to stop.
GRACEFUL_SECONDS = 5
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def require() -> None:
    """Raise a one-line :class:`UsageError` saying how to install what serving needs, when it is missing."""
    missing = [name for name in LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"serving needs {' and '.join(missing)}: pip install 'lastlayer[serve]'")


def model_name(graph: str) -> tuple[str, str]:
    """``(name, url)`` of a ``--graph`` value: ``NAME=URL``, or the file name without ``.onnx``.

    Raises:
        UsageError: the name cannot appear in a URL path.
    """
    head, sep, tail = graph.partition("=")
    if sep and "/" not in head and ":" not in head:
        name, url = head, tail
    else:
        name, url = posixpath.splitext(posixpath.basename(graph.rstrip("/")))[0], graph
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"--graph={graph}: {name!r} cannot name a model in URLs; give it a name as NAME=URL "
            "(letters, digits, '_', '.', '-')"
        )
    return name, url


def load_models(
    graphs: list[str], threads: int, storage_options: Mapping[str, Any] | None
) -> dict[str, RetrainedModel]:
    """Load each ``--graph`` (any URL) by its name.

    Raises:
        UsageError: two models get the same name.
        ModelError, StorageError: a model cannot be read.
    """
    models: dict[str, RetrainedModel] = {}
    for graph in graphs:
        name, url = model_name(graph)
        if name in models:
            raise UsageError(f"two models are named {name!r}: name them apart with --graph=NAME=URL")
        # no spin-waiting between network calls: the request's decoders need those cores meanwhile
        # (16 clients on 2 busy cores: 25 img/s with spinning, 41 without; docs/benchmarks.md)
        models[name] = RetrainedModel.load(url, threads=threads, storage_options=storage_options, spin=False)
    return models


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port).

    Raises:
        UsageError: the address cannot be used (taken, not this machine's, not an address).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without
    # it a keep-alive reply waits ~40 ms for the client's delayed ACK (Nagle's algorithm)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port, or a --host "
            "of this machine"
        ) from None
    return sock


def server(models: Mapping[str, RetrainedModel], options: ServeOptions) -> uvicorn.Server:
    """A uvicorn server of ``models``: ``.run(sockets=[listen(...)])`` serves until interrupted
    (Ctrl-C or SIGTERM stop it gracefully)."""
    import uvicorn

    from lastlayer.serve import guard
    from lastlayer.serve.app import create_app

    config = uvicorn.Config(
        create_app(models, options),
        http=guard.protocol(options.header_timeout),
        log_config=None,  # records go to the root logger: the CLI's handler and format
        access_log=options.access_log,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        # open connections; the app itself bounds the requests in progress (--max_queue)
        limit_concurrency=options.max_connections,
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)
