"""``service.use_tensorboard``: TensorBoard on the job's ``log_dir`` while the job runs.

The supervisor starts it (``python -m lastlayer.jobs.task --tensorboard``, as ``service.user``) once
the job is prepared, bound to 127.0.0.1 on a port the system picks, and stops it with the job. Its
address is read from what TensorBoard prints and kept in ``tensorboard.json`` (pid and URL) while it
runs, for ``lastlayer job plan show`` and ``job tasks``; its output goes to ``tensorboard/stderr``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from lastlayer.jobs.state import Job, alive, end_process, last_line, terminate
from lastlayer.storage import write_private

log = logging.getLogger(__name__)

#: Longest wait for TensorBoard to say where it listens, seconds.
START_TIMEOUT_S = 120.0
_HEAD = 1 << 20  # TensorBoard says where it listens in its first lines
_ADDRESS = re.compile(r"\bat (http://127\.0\.0\.1:\d+/)")


def installed() -> bool:
    """Whether TensorBoard can be imported here."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoard:
    """One TensorBoard process of a job."""

    def __init__(self, job: Job, env: dict[str, str]) -> None:
        """Start it with ``env`` (the tasks' environment, with a task description naming the
        ``log_dir`` and the user); its URL is known once :meth:`poll` has seen it."""
        self.job = job
        self.url = ""
        self.started = time.monotonic()
        folder = job.folder / "tensorboard"
        folder.mkdir(mode=0o700, exist_ok=True)
        self.stderr = folder / "stderr"
        out = os.open(folder / "stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(self.stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "lastlayer.jobs.task", "--tensorboard"],
                env=env,
                cwd=folder,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(out)
            os.close(err)

    def poll(self) -> None:
        """Note TensorBoard's URL once it prints it; say so when it ends or stays silent too long."""
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            self._gone(f"TensorBoard stopped (exit code {self.proc.returncode})")
            return
        if self.url:
            return
        with open(self.stderr, "rb") as f:
            found = _ADDRESS.search(f.read(_HEAD).decode(errors="replace"))
        if found:
            self.url = found.group(1)
            info = {"pid": self.proc.pid, "url": self.url}
            write_private(self.job.tensorboard_path, json.dumps(info).encode())
            log.info("TensorBoard at %s (while the job runs)", self.url)
        elif time.monotonic() - self.started > START_TIMEOUT_S:
            log.warning(
                "TensorBoard did not start listening within %g s; see %s", START_TIMEOUT_S, self.stderr
            )
            self.stop()

    def _gone(self, what: str) -> None:
        reason = last_line(self.stderr)
        log.warning("%s%s; see %s", what, f": {reason}" if reason else "", self.stderr)
        self.job.tensorboard_path.unlink(missing_ok=True)
        self.proc = None

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`)."""
        self.job.tensorboard_path.unlink(missing_ok=True)
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None


def running(job: Job) -> tuple[int, str] | None:
    """``(pid, URL)`` of the job's TensorBoard while it runs, else ``None``."""
    try:
        info = json.loads(job.tensorboard_path.read_text())
        pid, address = int(info["pid"]), str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, address) if alive(pid) else None


def stop(job: Job) -> None:
    """Stop the job's TensorBoard if one still runs (its supervisor was killed)."""
    try:
        pid = json.loads(job.tensorboard_path.read_text()).get("pid")
    except (OSError, ValueError):
        return
    if isinstance(pid, int) and alive(pid) and _is_tensorboard(pid):
        end_process(pid)
    job.tensorboard_path.unlink(missing_ok=True)


def _is_tensorboard(pid: int) -> bool:
    """Whether process ``pid`` is a job's TensorBoard (not a process that reused its id)."""
    try:
        return b"--tensorboard" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
