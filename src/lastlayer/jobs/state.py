"""The state folder of a deployed job, and the process utilities (pid files, ``/proc``) that watch it.

Layout of ``<state_dir>/<service name>/``::

    options.json          the options file as deployed
    plan.json             the deploy plan with live statuses (see :mod:`lastlayer.jobs.plan`)
    supervisor.pid/.log   the supervising process
    job/                  the extracted job archive
    private/              0700: keytab, krb5.conf, credential cache, Hadoop and Spark configuration
    persist/              log_dir when service.shared_filesystem is not set
    tasks/<task>/         stdout, stderr and sandbox/ of each task

Everything is a file, so another shell (``lastlayer job plan show``) can watch a running job.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from lastlayer.errors import UsageError
from lastlayer.jobs.plan import Plan
from lastlayer.jobs.spec import JobSpec
from lastlayer.storage import write_atomic

#: How long a stopped process may take to end before it is killed, and a killed one to go, seconds.
STOP_GRACE_S = 10.0


def default_state_dir() -> Path:
    """``LASTLAYER_STATE_DIR``, else ``~/.lastlayer/jobs``."""
    return Path(os.environ.get("LASTLAYER_STATE_DIR") or Path.home() / ".lastlayer" / "jobs")


@dataclass(frozen=True)
class Job:
    """The state folder of one deployed service."""

    folder: Path

    @classmethod
    def named(cls, name: str, state_dir: str | os.PathLike[str] | None = None) -> Job:
        """The job of service ``name`` under ``state_dir`` (default :func:`default_state_dir`)."""
        return cls(Path(state_dir or default_state_dir()) / name)

    @property
    def plan_path(self) -> Path:
        """``plan.json``."""
        return self.folder / "plan.json"

    @property
    def pid_path(self) -> Path:
        """``supervisor.pid``: the supervisor's process id while it runs."""
        return self.folder / "supervisor.pid"

    def task_dir(self, task: str) -> Path:
        """The folder of task ``task`` (``worker-0``)."""
        return self.folder / "tasks" / task

    def plan(self) -> Plan:
        """The current plan; UsageError when nothing is deployed under this name."""
        if not self.plan_path.exists():
            deployed = sorted(p.name for p in self.folder.parent.glob("*/plan.json"))
            raise UsageError(
                f"no job {self.folder.name!r} in {self.folder.parent} (deployed: "
                f"{', '.join(deployed) or 'none'}): deploy one with `lastlayer job deploy OPTIONS`"
            )
        return Plan.load(self.plan_path)

    def save_spec(self, spec: JobSpec) -> None:
        """Keep the deployed options as ``options.json``."""
        write_atomic(str(self.folder / "options.json"), json.dumps(spec.to_dict(), indent=1).encode())

    def save_pid(self, pid: int) -> None:
        """Record the supervisor's process id."""
        write_atomic(str(self.pid_path), str(pid).encode())

    def spec(self) -> JobSpec:
        """The options as deployed."""
        spec, _ = JobSpec.from_dict(json.loads((self.folder / "options.json").read_text()))
        return spec

    def supervisor_pid(self) -> int | None:
        """The supervisor's process id, if it runs."""
        pid = read_pid(self.pid_path)
        return pid if alive(pid) else None

    def supervisor_alive(self) -> bool:
        """Whether the job's supervisor runs."""
        return self.supervisor_pid() is not None


def read_pid(path: Path) -> int | None:
    """The process id in a pid file, or ``None`` when there is none."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"


def end_process(pid: int, first: signal.Signals = signal.SIGTERM) -> None:
    """Send ``first`` to ``pid`` and wait up to :data:`STOP_GRACE_S` for it to end; then SIGKILL it
    and wait as long again."""
    for sig in dict.fromkeys((first, signal.SIGKILL)):
        if not alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_GRACE_S
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid``, MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def last_line(path: Path) -> str:
    """The last non-blank line of a text file ("" when there is none)."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
