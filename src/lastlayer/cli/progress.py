"""The progress display of long commands."""

from __future__ import annotations

import logging
import time
from typing import TextIO

log = logging.getLogger("lastlayer")


class ProgressBar:
    """Items done, items/s and ETA: a redrawn bar on a terminal, a log line every ``every`` s otherwise."""

    def __init__(
        self, stream: TextIO, what: str = "Bottlenecks", unit: str = "images", every: float = 10.0
    ) -> None:
        self.stream = stream
        self.what = what
        self.unit = unit
        self.tty = stream.isatty()
        self.every = every
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        text = (
            f"{done}/{total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}  ")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self.last >= self.every or done >= total:
            self.last = now
            log.info("%s: %s", self.what, text)
