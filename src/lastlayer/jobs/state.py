"""The state folder of a deployed job, its lock, and the process utilities (pid files, ``/proc``).

Layout of ``<state_dir>/<service name>/`` (a name's folder levels joined by ``.``: ``dev/poets`` is
``dev.poets``, so one job's folder never holds another's)::

    options.json          the options as deployed, passwords in URLs masked
    plan.json             the deploy plan with live statuses (see :mod:`lastlayer.jobs.plan`)
    supervisor.pid/.log   the supervising process
    tensorboard.json      TensorBoard's process and URL while it runs (service.use_tensorboard)
    tensorboard/          TensorBoard's stdout and stderr
    job/                  the extracted job archive
    private/              keytab (while the job runs), krb5.conf, credential cache, Hadoop and Spark
                          configuration
    task-private/         what the tasks read of private/, when they run as another user
    persist/              log_dir when service.shared_filesystem is not set
    tasks/<task>/         stdout, stderr and sandbox/ of each task

The folder is 0700 and every file the service writes in it 0600 (when the tasks run as another user,
the folders on their way are 0710 to that user's group and what they use is theirs). The job is
locked while it is deployed or runs: ``<state_dir>/.locks/<folder>.lock``, an ``flock`` that ends
with the process holding it. Everything is a file, so another shell can watch a running job.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

from lastlayer.errors import DataError, StorageError, UsageError
from lastlayer.fetch import one_line, shown
from lastlayer.jobs.plan import Plan
from lastlayer.jobs.spec import HdfsSpec, JobSpec, ServiceSpec, name_problem
from lastlayer.storage import write_private

#: How long a stopped process may take to end before it is killed, and a killed one to go, seconds.
STOP_GRACE_S = 10.0
LOCKS = ".locks"


def default_state_dir() -> Path:
    """``LASTLAYER_STATE_DIR``, else ``~/.lastlayer/jobs``."""
    return Path(os.environ.get("LASTLAYER_STATE_DIR") or Path.home() / ".lastlayer" / "jobs")


def _state_root(state_dir: str | os.PathLike[str] | None) -> Path:
    """The state folder; an existing path that is not a folder is refused, naming where it came from."""
    root = Path(state_dir or default_state_dir())
    if root.exists() and not root.is_dir():
        where = "--state_dir" if state_dir else "the state folder (LASTLAYER_STATE_DIR or ~/.lastlayer/jobs)"
        raise UsageError(f"{where} {root} is not a folder: give a folder (it is created if missing)")
    return root


@dataclass(frozen=True)
class Job:
    """The state folder of one deployed service."""

    folder: Path

    @classmethod
    def named(
        cls, name: str, state_dir: str | os.PathLike[str] | None = None, setting: str = "--name"
    ) -> Job:
        """The job of service ``name`` under ``state_dir`` (default :func:`default_state_dir`).

        Raises:
            UsageError: ``name`` breaks DC/OS's service-name rules (named as ``setting``), or
                ``state_dir`` is not a folder.
        """
        problem = name_problem(name)
        if problem:
            raise UsageError(f"{setting}: {problem}")
        return cls(_state_root(state_dir) / name.strip("/").replace("/", "."))

    @property
    def name(self) -> str:
        """The service name."""
        return self.folder.name.replace(".", "/")

    @property
    def plan_path(self) -> Path:
        """``plan.json``."""
        return self.folder / "plan.json"

    @property
    def pid_path(self) -> Path:
        """``supervisor.pid``: the supervisor's process id while it runs."""
        return self.folder / "supervisor.pid"

    @property
    def tensorboard_path(self) -> Path:
        """``tensorboard.json``: TensorBoard's process id and URL while it runs."""
        return self.folder / "tensorboard.json"

    def task_dir(self, task: str) -> Path:
        """The folder of task ``task`` (``worker-0``)."""
        return self.folder / "tasks" / task

    def lock(self) -> JobLock:
        """Take the job's lock, or refuse: another process deploys or runs it.

        Raises:
            UsageError: the lock is held (naming the process holding it).
            StorageError: the state folder cannot be written.
        """
        lock = JobLock(self.folder.parent / LOCKS / f"{self.folder.name}.lock")
        try:
            holder = lock.acquire()
        except OSError as exc:
            raise StorageError(
                f"cannot lock job {self.name!r} in {self.folder.parent}: {one_line(exc.strerror or exc)}; "
                "use a --state_dir you may write to"
            ) from None
        if holder is not None:
            raise UsageError(
                f"job {self.name!r} is being deployed or is running (process {holder}): wait for it, stop "
                f"it with `lastlayer job stop --name {self.name}`, or deploy under another service.name"
            )
        return lock

    def create(self) -> None:
        """An empty private folder for the job, replacing the one of an earlier deploy."""
        try:
            self.remove()
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.folder.mkdir(mode=0o700)
            self.folder.chmod(0o700)
        except OSError as exc:
            raise StorageError(
                f"cannot create the job's state folder {self.folder}: {one_line(exc.strerror or exc)}; "
                "deploy with a --state_dir you may write to"
            ) from None

    def _check_folder(self) -> None:
        """A job's folder is a real folder (never a link that could lead outside the state folder)."""
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            raise UsageError(
                f"{self.folder} is not a folder of lastlayer's (a link or a file): remove it yourself"
            )

    def remove(self) -> None:
        """Remove the job's folder; only ever a real folder inside the state folder."""
        self._check_folder()
        if not self.folder.exists():
            return
        root = os.path.realpath(self.folder.parent)
        if os.path.dirname(os.path.realpath(self.folder)) != root:
            raise UsageError(f"{self.folder} is outside the state folder {root}: not removed")
        shutil.rmtree(self.folder)

    def plan(self) -> Plan:
        """The current plan.

        Raises:
            UsageError: nothing is deployed under this name.
            DataError: ``plan.json`` is unreadable.
        """
        self._check_folder()
        if not self.plan_path.exists():
            deployed = sorted(p.parent.name.replace(".", "/") for p in self.folder.parent.glob("*/plan.json"))
            raise UsageError(
                f"no job {self.name!r} in {self.folder.parent} (deployed: {', '.join(deployed) or 'none'}): "
                "deploy one with `lastlayer job deploy OPTIONS`"
            )
        try:
            return Plan.load(self.plan_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"the plan of job {self.name!r} ({self.plan_path}) is unreadable ({one_line(exc)}): "
                f"deploy it again, or remove it with `lastlayer job uninstall --name {self.name}`"
            ) from None

    def save_spec(self, spec: JobSpec) -> None:
        """Keep the deployed options as ``options.json``, every password in a URL masked."""
        data = json.dumps(masked(spec).to_dict(), indent=1).encode()
        write_private(self.folder / "options.json", data)

    def save_pid(self, pid: int) -> None:
        """Record the supervisor's process id."""
        write_private(self.pid_path, str(pid).encode())

    def spec(self) -> JobSpec:
        """The options as deployed (passwords in URLs masked).

        Raises:
            DataError: ``options.json`` is unreadable.
        """
        path = self.folder / "options.json"
        try:
            spec, _ = JobSpec.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, UsageError) as exc:
            raise DataError(
                f"the options of job {self.name!r} ({path}) are unreadable ({one_line(exc)}): deploy it "
                "again with `lastlayer job deploy OPTIONS`"
            ) from None
        return spec

    def supervisor_pid(self) -> int | None:
        """The supervisor's process id, if it runs."""
        pid = read_pid(self.pid_path)
        return pid if alive(pid) else None


def masked(spec: JobSpec) -> JobSpec:
    """``spec`` with the password or token of every URL it holds masked (``http://***@host/...``)."""
    service = spec.service
    return replace(
        spec,
        service=replace(
            service,
            job_url=shown(service.job_url),
            shared_filesystem=shown(service.shared_filesystem),
            hdfs=replace(service.hdfs, config_uri=shown(service.hdfs.config_uri)),
        ),
    )


def masked_urls(service: ServiceSpec | HdfsSpec) -> list[str]:
    """The options of ``service`` (a section) holding a URL whose password was masked away."""
    names = ("job_url", "shared_filesystem") if isinstance(service, ServiceSpec) else ("config_uri",)
    return [n for n in names if urllib.parse.urlsplit(getattr(service, n)).username == "***"]


class JobLock:
    """An exclusive ``flock`` on a lock file: it ends with the process (and its children given the
    descriptor), so it cannot go stale."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> int | None:
        """Take the lock without waiting; ``None`` when taken, else the pid written by its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                return int(holder) if holder.isdigit() else 0
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that an uninstall removed meanwhile
                self.fd = fd
                self.mark(os.getpid())
                return None
            os.close(fd)

    def mark(self, pid: int) -> None:
        """Write the holder's process id into the lock file (for messages)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(pid).encode(), 0)

    def close(self) -> None:
        """Close this process's descriptor: the lock ends unless a child holds a copy (no LOCK_UN,
        which would end it for that child too)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Remove the lock file (held), then close."""
        self.path.unlink(missing_ok=True)
        self.close()


def read_pid(path: Path) -> int | None:
    """The process id in a pid file, or ``None`` when there is none."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid is None or pid <= 0:
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


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """End our child ``proc``: SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`; reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_GRACE_S)


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid``, MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def last_line(path: Path, window: int = 64 * 1024) -> str:
    """The last non-blank line of a text file, read from its last ``window`` bytes ("" when there is
    none): a task's log may be huge."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - window))
            text = f.read(window).decode(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def make_private(path: Path) -> None:
    """Take group and other permissions off ``path`` and everything under it (links left alone)."""
    for folder, dirs, files in os.walk(path):
        os.chmod(folder, os.stat(folder).st_mode & 0o700)
        for name in files + dirs:
            child = os.path.join(folder, name)
            if not os.path.islink(child) and not os.path.isdir(child):
                os.chmod(child, os.stat(child).st_mode & 0o700)
