"""Deploy, supervise, inspect and stop jobs; all state lives in a folder so another shell can watch.

Layout of ``<state_dir>/<service name>/``::

    options.json          the options file as deployed
    plan.json             the deploy plan with live statuses (see :mod:`lastlayer.jobs.plan`)
    supervisor.pid/.log   the supervising process
    job/                  the extracted job archive
    private/              0700: keytab, krb5.conf, credential cache, Hadoop configuration
    persist/              log_dir when service.shared_filesystem is not set
    tasks/<task>/         stdout, stderr and sandbox/ of each task

The supervisor prepares once (GPU check, Kerberos login from the keytab secret, Hadoop
configuration, the job archive), starts one process per pending step, enforces ``mem`` by watching
each task's resident memory, bounds threads to ``cpus`` cores, renews the Kerberos ticket, and
records every status change in ``plan.json``.

When the job context asks for ``--engine spark``, the workers become Spark executors: the supervisor
writes ``private/spark-conf/spark-defaults.conf`` (``SPARK_CONF_DIR`` of every task) with
``spark.executor.instances`` = ``worker.count``, ``spark.executor.cores`` = ``worker.cpus``,
``spark.executor.memory`` = ``worker.mem`` and, for this one machine, ``spark.master`` =
``local[count x cpus]``; worker-0 is the Spark driver and gets all those cores and ``count x mem``,
and the other workers have nothing left to do. A ``--spark_master`` in the context (``yarn``,
``k8s://...``) wins over that master and keeps the executor settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from lastlayer import archive, secrets
from lastlayer.engines.spark import configured_master
from lastlayer.errors import LastlayerError, UsageError
from lastlayer.hadoop import ClusterConfig, HadoopLogin
from lastlayer.jobs.plan import COMPLETE, ERROR, PENDING, PHASES, RUNNING, STARTING, Plan, Step, new_plan
from lastlayer.jobs.task import TASK_ENV
from lastlayer.jobspec import JobSpec

log = logging.getLogger(__name__)

POLL_S = 0.5
STOP_GRACE_S = 10.0
ROLE_OF_PREFIX = {prefix: group for _, group, prefix in PHASES}


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
        return self.folder / "plan.json"

    def task_dir(self, task: str) -> Path:
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

    def spec(self) -> JobSpec:
        spec, _ = JobSpec.from_dict(json.loads((self.folder / "options.json").read_text()))
        return spec

    def supervisor_alive(self) -> bool:
        return _alive(_read_pid(self.folder / "supervisor.pid"))


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
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


def gpu_available() -> bool:
    """Whether this machine shows an NVIDIA GPU."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _private(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def _krb5_conf(spec: JobSpec) -> str:
    k = spec.service.security.kerberos
    return (
        f"[libdefaults]\n default_realm = {k.realm}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n"
        f" rdns = false\n dns_canonicalize_hostname = false\n udp_preference_limit = 1\n"
        f"[realms]\n {k.realm} = {{\n  kdc = {k.kdc.hostname}:{k.kdc.port}\n }}\n"
    )


@dataclass
class _Prepared:
    env: dict[str, str]
    module_dir: Path
    log_dir: str


def spark_engine(spec: JobSpec) -> bool:
    """Whether the job context asks ``lastlayer retrain`` for ``--engine spark``."""
    args = spec.context().get("args", {})
    return isinstance(args, dict) and str(args.get("--engine", "")).strip().lower() == "spark"


def spark_defaults(spec: JobSpec) -> str:
    """``spark-defaults.conf`` mapping the workers onto Spark executors (see the module doc), after the
    lines of an existing ``$SPARK_CONF_DIR/spark-defaults.conf``; a master already configured stays."""
    worker = spec.worker
    cores = max(1, math.ceil(worker.cpus))
    lines = []
    existing = os.environ.get("SPARK_CONF_DIR")
    if existing and os.path.isfile(os.path.join(existing, "spark-defaults.conf")):
        lines.append(Path(existing, "spark-defaults.conf").read_text(encoding="utf-8").rstrip("\n"))
    if configured_master() is None:
        lines.append(f"spark.master local[{worker.count * cores}]")
    lines += [
        f"spark.executor.instances {worker.count}",
        f"spark.executor.cores {cores}",
        f"spark.executor.memory {int(worker.mem)}m",
    ]
    return "\n".join(lines) + "\n"


def _hadoop_login(spec: JobSpec, private: Path) -> HadoopLogin:
    """The job's login (not yet entered): as ``primary@realm`` from the keytab secret with a private
    krb5.conf when Kerberos is enabled, and ``hdfs.config_uri``; its files go to ``private``."""
    k = spec.service.security.kerberos
    config = ClusterConfig(hdfs_config_uri=spec.service.hdfs.config_uri)
    if k.enabled:
        keytab = private / "keytab"
        secrets.write_private(keytab, secrets.read_secret(k.keytab_secret))
        krb5_conf = private / "krb5.conf"
        secrets.write_private(krb5_conf, _krb5_conf(spec).encode())
        config = ClusterConfig(
            principal=f"{k.primary}@{k.realm}",
            keytab=str(keytab),
            krb5_conf=str(krb5_conf),
            hdfs_config_uri=spec.service.hdfs.config_uri,
        )
    return HadoopLogin(config, folder=str(private))


def _prepare(job: Job, spec: JobSpec, stack: ExitStack) -> _Prepared:
    """Everything before the tasks start; the login stays in ``stack`` (renewed until it closes).
    Raises LastlayerError with a one-line reason."""
    if spec.gpu_worker.count > 0 and not gpu_available():
        raise UsageError(
            f"gpu_worker.count is {spec.gpu_worker.count} but this machine has no GPU "
            "(no /dev/nvidia0, no nvidia-smi): set gpu_worker.count to 0"
        )
    private = _private(job.folder / "private")
    env = stack.enter_context(_hadoop_login(spec, private)).env()
    extracted = job.folder / "job"
    archive.fetch_and_extract(spec.service.job_url, str(extracted), replace=True)
    module_dir = extracted / spec.service.job_path
    if not module_dir.is_dir():
        top = sorted(p.relative_to(extracted).as_posix() for p in extracted.glob("*/*") if p.is_dir())
        raise UsageError(
            f"service.job_path {spec.service.job_path!r} is not a folder of the archive "
            f"{spec.service.job_url}; it holds: {', '.join(top[:20]) or 'no folders'}"
        )
    if spark_engine(spec):
        conf = _private(private / "spark-conf")
        (conf / "spark-defaults.conf").write_text(spark_defaults(spec))
        env["SPARK_CONF_DIR"] = str(conf)
    log_dir = spec.service.shared_filesystem or str(job.folder / "persist")
    if not spec.service.shared_filesystem:
        (job.folder / "persist").mkdir(exist_ok=True)
    return _Prepared(env, module_dir, log_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster(plan: Plan) -> dict[str, list[str]]:
    cluster: dict[str, list[str]] = {}
    for step in plan.steps:
        role = step.name.rsplit("-", 1)[0]
        cluster.setdefault(role, []).append(f"127.0.0.1:{_free_port()}")
    return cluster


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class _Supervisor:
    """Runs the pending steps of a job's plan to completion."""

    def __init__(self, job: Job, timeout: float | None, on_change: Callable[[Plan], None] | None) -> None:
        self.job = job
        self.spec = job.spec()
        self.plan = job.plan()
        self.timeout = timeout
        self.on_change = on_change
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def save(self) -> None:
        self.plan.save(self.job.plan_path)
        if self.on_change is not None:
            self.on_change(self.plan)

    def fail_pending(self, message: str) -> None:
        for step in self.plan.steps:
            if step.status != COMPLETE:
                step.status, step.message = ERROR, message
        self.save()

    def start(self, step: Step, prepared: _Prepared, cluster: dict[str, list[str]]) -> None:
        role, index = step.name.rsplit("-", 1)
        group = getattr(self.spec, ROLE_OF_PREFIX[role])
        folder = self.job.task_dir(step.name)
        (folder / "sandbox").mkdir(parents=True, exist_ok=True)
        cores = sorted(os.sched_getaffinity(0))[: max(1, math.ceil(group.cpus)) * self.share(step.name)]
        task = {
            "cluster": cluster,
            "role": role,
            "index": int(index),
            "module_dir": str(prepared.module_dir),
            "module": self.spec.service.job_name,
            "log_dir": prepared.log_dir,
            "context": self.spec.context(),
            "log_level": self.spec.service.log_level,
        }
        env = {
            **os.environ,
            **prepared.env,
            TASK_ENV: json.dumps(task),
            "MESOS_SANDBOX": str(folder / "sandbox"),
            "OMP_NUM_THREADS": str(len(cores)),
        }
        with open(folder / "stdout", "ab") as out, open(folder / "stderr", "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lastlayer.jobs.task"],
                cwd=folder / "sandbox",
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: os.sched_setaffinity(0, cores),
            )
        self.procs[step.name] = proc
        step.status, step.pid, step.message, step.exit_code = RUNNING, proc.pid, None, None
        mem = group.mem * self.share(step.name)
        log.info("Started %s (pid %d, %d cores, mem %g MiB)", step.name, proc.pid, len(cores), mem)

    def share(self, name: str) -> int:
        """How many workers' cores and memory a task gets: all of them for the Spark driver."""
        return self.spec.worker.count if name == "worker-0" and spark_engine(self.spec) else 1

    def run(self) -> Plan:
        todo = [s for s in self.plan.steps if s.status != COMPLETE]
        for step in todo:
            step.status, step.message = STARTING, None
        self.save()
        with ExitStack() as stack:
            try:
                prepared = _prepare(self.job, self.spec, stack)
            except LastlayerError as exc:
                self.fail_pending(str(exc))
                return self.plan
            cluster = _cluster(self.plan)
            try:
                for step in todo:
                    self.start(step, prepared, cluster)
                self.save()
                self.watch()
            except BaseException:  # stopped (SIGTERM) or broken: no task outlives its supervisor
                self.kill_all("stopped")
                self.save()
                raise
        return self.plan

    def watch(self) -> None:
        deadline = None if not self.timeout else time.monotonic() + self.timeout
        while self.procs:
            time.sleep(POLL_S)
            changed = self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.kill_all(f"timed out after {self.timeout:.0f} s")
                changed = True
            if self.workers_done():
                self.kill_all("stopped: the workers finished", status=COMPLETE)
                changed = True
            if changed:
                self.save()

    def poll(self) -> bool:
        changed = False
        for name, proc in list(self.procs.items()):
            step = self.plan.step(name)
            group = getattr(self.spec, ROLE_OF_PREFIX[name.rsplit("-", 1)[0]])
            code = proc.poll()
            if code is None:
                rss, mem = _rss_mib(proc.pid), group.mem * self.share(name)
                if rss > mem:
                    proc.kill()
                    proc.wait(timeout=STOP_GRACE_S)
                    self.finish(step, ERROR, -9, f"used {rss:.0f} MiB, over its mem of {mem:g} MiB")
                    changed = True
                continue
            if code == 0:
                self.finish(step, COMPLETE, 0, None)
            else:
                reason = _last_line(self.job.task_dir(name) / "stderr") or f"exit code {code}"
                self.finish(step, ERROR, code, reason)
            changed = True
        return changed

    def finish(self, step: Step, status: str, code: int | None, message: str | None) -> None:
        step.status, step.exit_code, step.message, step.pid = status, code, message, None
        self.procs.pop(step.name, None)
        log.info("%s: %s%s", step.name, status, f" ({message})" if message else "")

    def workers_done(self) -> bool:
        """Parameter servers serve the workers: once no worker runs, they are stopped."""
        running = set(self.procs)
        return bool(running) and all(n.startswith("ps-") for n in running)

    def kill_all(self, message: str, status: str = ERROR) -> None:
        for name, proc in list(self.procs.items()):
            _terminate(proc)
            self.finish(self.plan.step(name), status, proc.returncode, message)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_GRACE_S)


def supervise(
    job: Job, timeout: float | None = None, on_change: Callable[[Plan], None] | None = None
) -> Plan:
    """Run the job's pending and failed steps to the end (in this process); return the final plan."""
    (job.folder / "supervisor.pid").write_text(str(os.getpid()))
    try:
        return _Supervisor(job, timeout, on_change).run()
    finally:
        (job.folder / "supervisor.pid").unlink(missing_ok=True)


def _spawn_supervisor(job: Job, timeout: float | None) -> None:
    argv = [sys.executable, "-m", "lastlayer.jobs.service", str(job.folder)]
    if timeout:
        argv.append(str(timeout))
    with open(job.folder / "supervisor.log", "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )
    (job.folder / "supervisor.pid").write_text(str(proc.pid))


def deploy(
    options: str,
    state_dir: str | os.PathLike[str] | None = None,
    *,
    detach: bool = False,
    timeout: float | None = None,
    on_change: Callable[[Plan], None] | None = None,
) -> tuple[Job, Plan]:
    """Deploy the job described by the options file at ``options`` (a path or URL).

    In the foreground the call returns when the plan is COMPLETE or in ERROR; with ``detach`` it
    returns once the supervisor runs, and ``plan show`` follows it.
    """
    spec, warnings = JobSpec.load(options)
    for warning in warnings:
        log.warning("%s", warning)
    job = Job.named(spec.service.name, state_dir)
    if job.supervisor_alive():
        raise UsageError(
            f"job {spec.service.name!r} is running: `lastlayer job stop --name "
            f"{spec.service.name}` first, or deploy under another service.name"
        )
    shutil.rmtree(job.folder, ignore_errors=True)
    job.folder.mkdir(parents=True)
    (job.folder / "options.json").write_text(json.dumps(spec.to_dict(), indent=1))
    counts = {group: getattr(spec, group).count for _, group, _ in PHASES}
    plan = new_plan(counts)
    plan.save(job.plan_path)
    if detach:
        _spawn_supervisor(job, timeout)
        return job, plan
    return job, supervise(job, timeout, on_change)


def restart(
    name: str,
    state_dir: str | os.PathLike[str] | None = None,
    step: str | None = None,
    *,
    detach: bool = False,
    timeout: float | None = None,
    on_change: Callable[[Plan], None] | None = None,
) -> Plan:
    """Run a failed step (or every step not COMPLETE) again; the bottleneck cache makes it resume."""
    job = Job.named(name, state_dir)
    plan = job.plan()
    if job.supervisor_alive():
        raise UsageError(f"job {name!r} is still running: wait for it or `lastlayer job stop --name {name}`")
    names = [s.name for s in plan.steps]
    if step is not None and step not in names:
        raise UsageError(f"no step {step!r} in the plan of {name!r}; steps: {', '.join(names)}")
    for s in plan.steps:
        if (step is None and s.status != COMPLETE) or s.name == step:
            s.status, s.message, s.exit_code, s.restarts = PENDING, None, None, s.restarts + 1
    plan.save(job.plan_path)
    if detach:
        _spawn_supervisor(job, timeout)
        return plan
    return supervise(job, timeout, on_change)


@dataclass(frozen=True)
class TaskInfo:
    """A row of ``lastlayer job tasks``."""

    name: str
    status: str
    pid: int | None
    exit_code: int | None
    message: str | None


def tasks(name: str, state_dir: str | os.PathLike[str] | None = None) -> list[TaskInfo]:
    """The job's tasks with their statuses."""
    return [
        TaskInfo(s.name, s.status, s.pid, s.exit_code, s.message)
        for s in Job.named(name, state_dir).plan().steps
    ]


def task_log(
    name: str,
    task: str,
    stream: str = "stdout",
    *,
    completed: bool = False,
    state_dir: str | os.PathLike[str] | None = None,
) -> str:
    """A task's stdout or stderr. A finished task's log needs ``completed``, as ``dcos task log``."""
    job = Job.named(name, state_dir)
    plan = job.plan()
    try:
        step = plan.step(task)
    except KeyError:
        raise UsageError(
            f"no task {task!r} in job {name!r}; tasks: {', '.join(s.name for s in plan.steps)}"
        ) from None
    if stream not in ("stdout", "stderr"):
        raise UsageError(f"stream must be stdout or stderr, not {stream!r}")
    if step.status in (COMPLETE, ERROR) and not completed:
        raise UsageError(f"task {task} has finished ({step.status}): add --completed to read its log")
    path = job.task_dir(task) / stream
    if not path.exists():
        raise UsageError(f"task {task} has not started yet ({step.status}): no {stream} so far")
    return path.read_text(errors="replace")


def stop(name: str, state_dir: str | os.PathLike[str] | None = None) -> Plan:
    """Stop a running job: its supervisor and tasks; unfinished steps end in ERROR (stopped)."""
    job = Job.named(name, state_dir)
    plan = job.plan()
    supervisor = _read_pid(job.folder / "supervisor.pid")
    if _alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while _alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(supervisor):
            os.kill(supervisor, signal.SIGKILL)
    plan = job.plan()
    for step in plan.steps:
        if _alive(step.pid):
            os.kill(step.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_GRACE_S
            while _alive(step.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if step.status not in (COMPLETE, ERROR):
            step.status, step.message, step.pid = ERROR, "stopped", None
    plan.save(job.plan_path)
    (job.folder / "supervisor.pid").unlink(missing_ok=True)
    return plan


def uninstall(name: str, state_dir: str | os.PathLike[str] | None = None) -> None:
    """Stop the job if it runs and remove its state folder (logs and local outputs included)."""
    job = Job.named(name, state_dir)
    job.plan()
    stop(name, state_dir)
    shutil.rmtree(job.folder)


def _supervisor_main() -> int:
    """``python -m lastlayer.jobs.service FOLDER [TIMEOUT]``: the detached supervisor."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s:%(name)s:%(message)s")
    job = Job(Path(sys.argv[1]))
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = supervise(job, timeout)
    return 0 if plan.status == COMPLETE else 1


if __name__ == "__main__":
    sys.exit(_supervisor_main())
