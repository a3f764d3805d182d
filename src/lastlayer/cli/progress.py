"""The progress display of long commands.

On a terminal (TTY), one status line at the bottom of the screen is redrawn in place: the
bottleneck bar, then training with the latest train and validation accuracy. Log records are written
above it, and training's per-step lines (``Step N: Train accuracy = ...``) are left out there, since
the status line shows them. Anywhere else (a file, a pipe, a job's log, CI) nothing is redrawn: the
log holds retrain.py's lines exactly as always, and a bar logs one line every so often.

Hand-written rather than tqdm or rich: one redrawn line is a few lines of code, and the log
records must keep retrain.py's format, which those libraries' logging integrations change.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from lastlayer.training.train import Evaluation

log = logging.getLogger("lastlayer")

_ERASE = "\r\x1b[2K"  # carriage return, then erase the whole line (ANSI)
#: Seconds between redraws of the status line (the last state is always drawn).
REDRAW_SECONDS = 0.1


class StatusLine:
    """One line redrawn in place at the bottom of a terminal; safe to use from several threads."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.text = ""
        self._drawn = 0.0
        self._lock = threading.RLock()

    def show(self, text: str) -> None:
        """Replace the line with ``text`` (cut to the terminal's width, so it never wraps); redrawn at
        most every :data:`REDRAW_SECONDS`."""
        with self._lock:
            self.text = text[: max(shutil.get_terminal_size().columns - 1, 20)]
            if time.monotonic() - self._drawn >= REDRAW_SECONDS:
                self._draw()

    def done(self) -> None:
        """Leave the line on screen in its last state; the next :meth:`show` starts a new one."""
        with self._lock:
            if self.text:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
                self.text = ""

    def write_above(self, text: str) -> None:
        """Write ``text`` (whole lines) above the status line, then redraw it."""
        with self._lock:
            self.stream.write(_ERASE + text)
            if self.text:
                self._draw()
            self.stream.flush()

    def _draw(self) -> None:
        self.stream.write(_ERASE + self.text)
        self.stream.flush()
        self._drawn = time.monotonic()


def _not_a_step_line(record: logging.LogRecord) -> bool:
    """False for training's per-step lines, which the status line shows on a terminal."""
    return not (record.name == "lastlayer.train" and "Step %d:" in str(record.msg))


class TerminalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes log records above a :class:`StatusLine`, without training's per-step lines."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.status = StatusLine(stream)
        self.addFilter(_not_a_step_line)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.status.write_above(self.format(record) + self.terminator)
        except Exception:  # logging's own contract: a failed record never stops the program
            self.handleError(record)


def log_handler(stream: TextIO) -> logging.Handler:
    """The CLI's log handler on ``stream``: a :class:`TerminalHandler` on a terminal, else a plain one."""
    return TerminalHandler(stream) if stream.isatty() else logging.StreamHandler(stream)


def status_line(stream: TextIO) -> StatusLine:
    """The status line of the log handler writing to ``stream``, or a new one when there is none."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, TerminalHandler) and handler.stream is stream:
            return handler.status
    return StatusLine(stream)


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}]"


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class ProgressBar:
    """Items done, items/s and ETA: a redrawn status line on a terminal, a log line every ``every`` s
    otherwise."""

    def __init__(
        self, stream: TextIO, what: str = "Bottlenecks", unit: str = "images", every: float = 10.0
    ) -> None:
        self.what = what
        self.unit = unit
        self.status = status_line(stream) if stream.isatty() else None
        self.every = every
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        text = f"{done}/{total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {_clock(eta)}"
        if self.status is not None:
            if done >= total:
                text = f"{done}/{total} {self.unit}, {rate:.1f} {self.unit}/s in {_clock(now - self.start)}"
            self.status.show(f"{self.what} {_bar(done, total)} {text}")
            if done >= total:
                self.status.done()
        elif now - self.last >= self.every or done >= total:
            self.last = now
            log.info("%s: %s", self.what, text)


class TrainingProgress:
    """Training on a terminal's status line: step, the latest train and validation accuracy, ETA.

    Called with each evaluation point (:func:`lastlayer.retrain`'s ``on_evaluation``).
    """

    def __init__(self, stream: TextIO, steps: int) -> None:
        self.status = status_line(stream)
        self.steps = steps
        self.first: tuple[float, int] | None = None  # (time, steps done) at the first evaluation point

    def __call__(self, ev: Evaluation) -> None:
        done, now = ev.step + 1, time.monotonic()
        if self.first is None:
            self.first = (now, done)
        start, start_done = self.first
        rate = (done - start_done) / (now - start) if now > start else 0.0
        eta = (self.steps - done) / rate if rate > 0 else 0.0
        timing = f"in {_clock(now - start)}" if done >= self.steps else f"ETA {_clock(eta)}"
        validation = (
            "n/a" if ev.validation_accuracy is None else f"{ev.validation_accuracy:.1%} (N={ev.validation_n})"
        )
        self.status.show(
            f"Training {_bar(done, self.steps)} step {done}/{self.steps}, train accuracy "
            f"{ev.train_accuracy:.1%}, validation {validation}, cross entropy {ev.cross_entropy:.3f}, "
            f"{timing}"
        )
        if done >= self.steps:
            self.status.done()
