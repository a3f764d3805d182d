"""A content-addressed memo of results derived from the bottleneck cache (the trust stage's findings,
the report's charts), so that a warm re-run with the same inputs reads them instead of computing them.

Each entry is one file ``<bottleneck_dir>/<network>/results/<kind>-<key>``, in the cache folder of
the run's (first) feature network, written atomically (the cache's storage, local or ``hdfs://``).
Its key is the SHA-256 of everything the result depends on, passed by the caller, plus lastlayer's
version and the source of the code that computes it (:func:`key`): an entry is never stale, since
any change of input or code gives another key. An entry that cannot be read (absent, too large, the
storage down) is computed again; one that cannot be written is logged and skipped (a read-only cache
still works). Entries are never removed: each distinct result adds one (tens of KB for a chart, the
classifier and the distance's matrices for the trust stage), like the cache's own files.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer import storage
from lastlayer.errors import LastlayerError
from lastlayer.version import __version__

if TYPE_CHECKING:
    from lastlayer.bottlenecks.needs import Bottlenecks

log = logging.getLogger("lastlayer.retrain")

#: The memo's folder in a network's cache folder, and the largest entry read back.
FOLDER = "results"
MAX_ENTRY_BYTES = 256 << 20


@functools.cache
def code_digest(*packages: str) -> str:
    """SHA-256 hex of the ``.py`` files of ``packages`` (names of lastlayer's packages), in name order."""
    digest = hashlib.sha256()
    for package in packages:
        for source in sorted(importlib.resources.files(package).iterdir(), key=lambda p: p.name):
            if source.name.endswith(".py"):
                digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def key(code: str, *parts: Any) -> str:
    """SHA-256 hex of lastlayer's version, ``code`` (a :func:`code_digest`) and ``parts``: an array by
    its dtype, shape and bytes, anything else by its JSON; each part length-prefixed."""
    digest = hashlib.sha256(f"{__version__}\0{code}".encode())
    for part in parts:
        if isinstance(part, np.ndarray):
            array = np.ascontiguousarray(part)
            data = f"{array.dtype.str}{array.shape}".encode() + b"\0" + array.tobytes()
        else:
            data = json.dumps(part, sort_keys=True).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


@dataclass(frozen=True)
class Memo:
    """The memo at ``root`` (a folder URL), read and written with ``storage_options``."""

    root: str
    storage_options: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, bottlenecks: Bottlenecks) -> Memo:
        """The memo kept in the cache folder of the first feature network of ``bottlenecks``."""
        network = bottlenecks.sources[0]
        return cls(storage.join(network.url, FOLDER), network.storage_options)

    def url(self, kind: str, entry: str) -> str:
        """Where the entry ``entry`` (a :func:`key`) of ``kind`` is kept."""
        return storage.join(self.root, f"{kind}-{entry}")

    def get(self, kind: str, entry: str) -> bytes | None:
        """The bytes of an entry, or ``None`` when it cannot be read (absent, too large, storage down)."""
        try:
            return storage.read_bytes(
                self.url(kind, entry), self.storage_options, MAX_ENTRY_BYTES, "a result"
            )
        except LastlayerError:
            return None

    def put(self, kind: str, entry: str, data: bytes) -> None:
        """Keep an entry (atomically); a failure is logged, and the next run computes it again."""
        try:
            storage.write_atomic(self.url(kind, entry), data, self.storage_options)
        except LastlayerError as exc:
            log.warning(
                "A %s result was not kept for the next run (%s): it will be computed again", kind, exc
            )
