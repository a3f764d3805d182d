"""The job service's public functions: deploy, restart, plan, tasks, task_log, stop, uninstall.

Each takes the service name (``service.name`` of the options file) and the state folder
(``state_dir``, default :func:`lastlayer.jobs.state.default_state_dir`); the CLI's ``lastlayer job``
actions map onto them one to one. Nothing here prints.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lastlayer.errors import StorageError, UsageError
from lastlayer.jobs import capacity, tensorboard
from lastlayer.jobs.plan import COMPLETE, ERROR, PENDING, PHASES, Plan, new_plan
from lastlayer.jobs.prepare import remaining
from lastlayer.jobs.spec import JobSpec
from lastlayer.jobs.state import STOP_GRACE_S, Job, JobLock, alive, end_process
from lastlayer.jobs.supervisor import spawn, supervise
from lastlayer.jobs.user import check_reachable, python_unreachable, run_as

log = logging.getLogger(__name__)

StateDir = str | os.PathLike[str] | None
#: The most of a log ``task_log`` returns (its end), bytes.
MAX_LOG_BYTES = 16 << 20


def deploy(
    options: str,
    state_dir: StateDir = None,
    *,
    secrets_dir: str | None = None,
    detach: bool = False,
    timeout: float | None = None,
    on_change: Callable[[Plan], None] | None = None,
    scheduler: str = "local",
    yarn_env: str = "",
) -> tuple[Job, Plan]:
    """Deploy the job described by the options file at ``options`` (a path or URL).

    In the foreground the call returns when the plan is COMPLETE or in ERROR; with ``detach`` it
    returns once the supervisor runs, and ``plan show`` follows it. The options file's warnings
    (an alias) are logged. Everything that can be checked before the job's folder is touched is:
    the options, ``service.user``, the state folder, and that no other deploy of the same name runs.

    Args:
        secrets_dir: the secret store holding ``keytab_secret``.
        timeout: stop the job this many seconds after the call started, downloads included
            (``None``: no limit).
        on_change: called with the plan after every status change (foreground only).
        scheduler: ``local`` (processes on this machine) or ``yarn`` (:mod:`lastlayer.jobs.yarn`,
            in the foreground only).
        yarn_env: with ``yarn``, the URL of the tasks' packed Python.

    Raises:
        UsageError: bad options or user, a bad state folder, or the job is deployed or runs already.
    """
    deadline = _deadline(timeout)
    spec, warnings = JobSpec.load(options, seconds=remaining(deadline))
    for warning in warnings:
        log.warning("%s", warning)
    if scheduler == "yarn":
        return _deploy_yarn(spec, state_dir, yarn_env, secrets_dir, detach, deadline, on_change)
    capacity.check(spec, capacity.memory_mib())
    job = Job.named(spec.service.name, state_dir, setting="service.name")
    account = run_as(spec.service.user)
    if account is not None:
        check_reachable(job.folder, account)
        blocked = python_unreachable(account)
        if blocked is not None:
            log.warning(
                "service.user %r cannot enter %s, on the way to Python's standard library: what the "
                "job imports once it runs as that user will fail; install Python where that user can "
                "read it",
                account.name,
                blocked,
            )
    lock = job.lock()
    try:
        job.create()
        job.save_spec(spec)
        plan = new_plan({group: getattr(spec, group).count for _, group, _ in PHASES})
        plan.save(job.plan_path)
        if detach:
            spawn(job, spec, lock, deadline=deadline, secrets_dir=secrets_dir)
            return job, plan
        return job, supervise(job, spec, deadline=deadline, on_change=on_change, secrets_dir=secrets_dir)
    finally:
        lock.close()


def _deploy_yarn(
    spec: JobSpec,
    state_dir: StateDir,
    yarn_env: str,
    secrets_dir: str | None,
    detach: bool,
    deadline: float | None,
    on_change: Callable[[Plan], None] | None,
) -> tuple[Job, Plan]:
    """:func:`deploy` with ``scheduler="yarn"``: YARN places and sizes the tasks (no check of this
    machine's memory), this process follows them."""
    from lastlayer.jobs import yarn

    if detach:
        raise UsageError("--detach is not available with --scheduler=yarn: deploy in the foreground")
    yarn.check(spec, yarn_env)
    job = Job.named(spec.service.name, state_dir, setting="service.name")
    lock = job.lock()
    try:
        job.create()
        job.save_spec(spec)
        new_plan({group: getattr(spec, group).count for _, group, _ in PHASES}).save(job.plan_path)
        return job, yarn.run(
            job, spec, yarn_env, deadline=deadline, on_change=on_change, secrets_dir=secrets_dir
        )
    finally:
        lock.close()


def restart(
    name: str,
    state_dir: StateDir = None,
    step: str | None = None,
    *,
    secrets_dir: str | None = None,
    detach: bool = False,
    timeout: float | None = None,
    on_change: Callable[[Plan], None] | None = None,
) -> Plan:
    """Run a failed step (or every step not COMPLETE) again; the bottleneck cache makes it resume.

    The options are those deployed; a URL whose password was masked is not fetched again (what the
    deploy fetched is used).
    """
    deadline = _deadline(timeout)
    job = Job.named(name, state_dir)
    if _on_yarn(job):
        return _restart_yarn(job, step, secrets_dir, detach, deadline, on_change)
    plan = job.plan()
    spec = job.spec()
    try:
        lock = job.lock()
    except UsageError:
        raise UsageError(
            f"job {name!r} is still running: wait for it or `lastlayer job stop --name {name}`"
        ) from None
    try:
        names = [s.name for s in plan.steps]
        if step is not None and step not in names:
            raise UsageError(f"no step {step!r} in the plan of {name!r}; steps: {', '.join(names)}")
        for s in plan.steps:
            if (step is None and s.status != COMPLETE) or s.name == step:
                s.status, s.message, s.exit_code, s.restarts = PENDING, None, None, s.restarts + 1
        plan.save(job.plan_path)
        if detach:
            spawn(job, spec, lock, deadline=deadline, secrets_dir=secrets_dir)
            return plan
        return supervise(job, spec, deadline=deadline, on_change=on_change, secrets_dir=secrets_dir)
    finally:
        lock.close()


def _restart_yarn(
    job: Job,
    step: str | None,
    secrets_dir: str | None,
    detach: bool,
    deadline: float | None,
    on_change: Callable[[Plan], None] | None,
) -> Plan:
    """:func:`restart` of a job deployed with ``--scheduler=yarn``: a new application of the steps."""
    from lastlayer.jobs import yarn

    if detach:
        raise UsageError("--detach is not available for a YARN job: restart it in the foreground")
    try:
        lock = job.lock()
    except UsageError:
        raise UsageError(
            f"job {job.name!r} is still running: wait for it or `lastlayer job stop --name {job.name}`"
        ) from None
    try:
        return yarn.restart(job, step, deadline=deadline, on_change=on_change, secrets_dir=secrets_dir)
    finally:
        lock.close()


def _deadline(timeout: float | None) -> float | None:
    """When a deploy or restart started now with ``timeout`` must end (``time.monotonic()``)."""
    if timeout is None:
        return None
    if not timeout > 0:
        raise UsageError(f"timeout must be a positive number of seconds or None, got {timeout}")
    return time.monotonic() + timeout


def plan(name: str, state_dir: StateDir = None, secrets_dir: str | None = None) -> Plan:
    """The job's deploy plan with its live statuses; a YARN job's as YARN sees it now (logged in
    from the keytab secret in ``secrets_dir``)."""
    job = Job.named(name, state_dir)
    if _on_yarn(job):
        from lastlayer.jobs import yarn

        return yarn.refresh(job, secrets_dir)
    return job.plan()


def _on_yarn(job: Job) -> bool:
    """Whether the job was deployed with ``--scheduler=yarn`` (it has a YARN application)."""
    from lastlayer.jobs.yarn import AppRecord

    return AppRecord.load(job) is not None


def yarn_application(name: str, state_dir: StateDir = None) -> str | None:
    """The YARN application id of a job deployed with ``--scheduler=yarn``, else ``None``."""
    from lastlayer.jobs.yarn import AppRecord

    record = AppRecord.load(Job.named(name, state_dir))
    return None if record is None else record.app_id


@dataclass(frozen=True)
class TaskInfo:
    """A row of ``lastlayer job tasks``."""

    name: str
    status: str
    pid: int | None
    exit_code: int | None
    message: str | None


def tasks(name: str, state_dir: StateDir = None, secrets_dir: str | None = None) -> list[TaskInfo]:
    """The job's tasks with their statuses (a YARN job's: their containers, as YARN sees them now)."""
    steps = plan(name, state_dir, secrets_dir).steps
    return [TaskInfo(s.name, s.status, s.pid, s.exit_code, s.message) for s in steps]


def tensorboard_task(name: str, state_dir: StateDir = None) -> TaskInfo | None:
    """The job's TensorBoard while it runs (``service.use_tensorboard``), its URL as the message."""
    found = tensorboard.running(Job.named(name, state_dir))
    return None if found is None else TaskInfo("tensorboard", "RUNNING", found[0], None, found[1])


def task_log(
    name: str,
    task: str,
    stream: str = "stdout",
    *,
    completed: bool = False,
    state_dir: StateDir = None,
    secrets_dir: str | None = None,
) -> str:
    """A task's stdout or stderr (its last :data:`MAX_LOG_BYTES`). A finished task's log needs
    ``completed``, as ``dcos task log``. A YARN task's log is its container's (stdout and stderr
    together), which YARN gives once the application has ended.

    Raises:
        UsageError: no such task or stream, a finished task without ``completed``, or no log: the
            task has not started yet, or it failed before it started (saying why).
    """
    job = Job.named(name, state_dir)
    steps = job.plan()
    try:
        step = steps.step(task)
    except KeyError:
        raise UsageError(
            f"no task {task!r} in job {name!r}; tasks: {', '.join(s.name for s in steps.steps)}"
        ) from None
    if stream not in ("stdout", "stderr"):
        raise UsageError(f"stream must be stdout or stderr, not {stream!r}")
    if _on_yarn(job):
        from lastlayer.jobs import yarn

        return yarn.task_log(job, task, secrets_dir)[-MAX_LOG_BYTES:]
    path = job.task_dir(task) / stream
    if not path.exists():
        if step.status == ERROR:
            raise UsageError(
                f"task {task} failed before it started, so it has no log: {step.message or 'no reason given'}"
            )
        raise UsageError(f"task {task} has not started yet ({step.status}): no {stream} so far")
    if step.status in (COMPLETE, ERROR) and not completed:
        raise UsageError(f"task {task} has finished ({step.status}): add --completed to read its log")
    return _tail(path)


def _tail(path: Path) -> str:
    """The text of a log, its last :data:`MAX_LOG_BYTES` when it is longer (saying so first)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - MAX_LOG_BYTES))
            data = f.read(MAX_LOG_BYTES)
    except OSError as exc:
        raise StorageError(f"cannot read the log {path}: {exc.strerror}") from None
    head = f"[the first {size - len(data):,} bytes of {path} are left out]\n" if size > len(data) else ""
    return head + data.decode(errors="replace")


def stop(name: str, state_dir: StateDir = None, secrets_dir: str | None = None) -> Plan:
    """Stop a running job: its supervisor, tasks and TensorBoard (a YARN job: the deploy following
    it and its YARN application); unfinished steps end in ERROR (stopped)."""
    job = Job.named(name, state_dir)
    job.plan()
    supervisor = job.supervisor_pid()
    if supervisor is not None:
        end_process(supervisor)
    if _on_yarn(job):
        from lastlayer.jobs import yarn

        return yarn.stop(job, secrets_dir)
    tensorboard.stop(job)
    steps = job.plan()
    for step in steps.steps:
        if step.pid is not None and alive(step.pid):
            end_process(step.pid, signal.SIGKILL)
        if step.status not in (COMPLETE, ERROR):
            step.status, step.message, step.pid = ERROR, "stopped", None
    steps.save(job.plan_path)
    job.pid_path.unlink(missing_ok=True)
    return steps


def uninstall(name: str, state_dir: StateDir = None, secrets_dir: str | None = None) -> None:
    """Stop the job if it runs (a YARN job: its application) and remove its state folder (logs and
    local outputs included); nothing outside the state folder is removed."""
    job = Job.named(name, state_dir)
    stop(name, state_dir, secrets_dir)  # a job that does not exist ends here
    lock = _lock_after_stop(job)
    try:
        job.remove()
    finally:
        lock.remove()


def _lock_after_stop(job: Job) -> JobLock:
    """The job's lock, once its stopped supervisor has let it go (within :data:`STOP_GRACE_S`)."""
    deadline = time.monotonic() + STOP_GRACE_S
    while True:
        try:
            return job.lock()
        except UsageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
