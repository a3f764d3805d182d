"""The supervisor: prepare a job once, run its pending steps as task processes, watch them to the end.

It starts one process per pending step (:mod:`lastlayer.jobs.task`), as ``service.user``, bounds
each task's threads to its ``cpus`` cores (CPU affinity, ``OMP_NUM_THREADS``), enforces ``mem`` by
watching each task's resident memory, keeps the Kerberos ticket fresh, runs TensorBoard while the
job runs (``service.use_tensorboard``), stops the parameter servers once the workers are done, and
records every status change in ``plan.json``; the deploy's ``--timeout`` counts from its start,
preparation included. It runs in the deploying process, or detached as ``python -m
lastlayer.jobs.supervisor FOLDER [--timeout S] [--secrets_dir DIR] [--lock_fd FD]`` with the job's
options as JSON on its standard input (they may hold a URL's password, which no file keeps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lastlayer.errors import LastlayerError
from lastlayer.jobs import tensorboard
from lastlayer.jobs.plan import COMPLETE, ERROR, PHASES, RUNNING, STARTING, Plan, Step
from lastlayer.jobs.prepare import Prepared, prepare, remaining
from lastlayer.jobs.spec import JobSpec, TaskGroupSpec
from lastlayer.jobs.state import STOP_GRACE_S, Job, JobLock, last_line, rss_mib, terminate
from lastlayer.jobs.task import TASK_ENV, TaskDescription
from lastlayer.jobs.user import RunAs, hand_over, let_through, run_as

log = logging.getLogger(__name__)

#: How often the tasks are looked at, seconds.
POLL_S = 0.5
#: Most bytes of options a detached supervisor reads from its standard input.
MAX_SPEC_BYTES = 1 << 20
ROLE_OF_PREFIX = {prefix: group for _, group, prefix in PHASES}


def supervise(
    job: Job,
    spec: JobSpec,
    *,
    deadline: float | None = None,
    on_change: Callable[[Plan], None] | None = None,
    secrets_dir: str | None = None,
) -> Plan:
    """Run the job's steps that are not COMPLETE to the end (in this process); return the final plan.

    Args:
        spec: the job's options (as deployed, passwords included).
        deadline: stop the tasks at this ``time.monotonic()`` (``None``: no limit).
        on_change: called with the plan after every status change.
        secrets_dir: the secret store holding the keytab secret.
    """
    job.save_pid(os.getpid())
    try:
        return _Supervisor(job, spec, deadline, on_change, secrets_dir).run()
    finally:
        job.pid_path.unlink(missing_ok=True)


def spawn(
    job: Job, spec: JobSpec, lock: JobLock, *, deadline: float | None = None, secrets_dir: str | None = None
) -> None:
    """Start :func:`supervise` in a detached process (its log: ``supervisor.log``), handing it the
    job's lock and its options (on its standard input)."""
    argv = [sys.executable, "-m", "lastlayer.jobs.supervisor", str(job.folder), f"--lock_fd={lock.fd}"]
    left = remaining(deadline)
    if left is not None:
        argv.append(f"--timeout={max(left, 0.001)}")
    if secrets_dir:
        argv.append(f"--secrets_dir={secrets_dir}")
    out = os.open(job.folder / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=out,
            stdin=subprocess.PIPE,
            start_new_session=True,
            pass_fds=(lock.fd,),
        )
    finally:
        os.close(out)
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(json.dumps(spec.to_dict()).encode())
    lock.mark(proc.pid)
    job.save_pid(proc.pid)


class _Supervisor:
    """Runs the pending steps of a job's plan to completion."""

    def __init__(
        self,
        job: Job,
        spec: JobSpec,
        deadline: float | None,
        on_change: Callable[[Plan], None] | None,
        secrets_dir: str | None,
    ) -> None:
        self.job = job
        self.spec = spec
        self.plan = job.plan()
        self.deadline = deadline
        self.timeout = remaining(deadline)
        self.on_change = on_change
        self.secrets_dir = secrets_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.shares: dict[str, int] = {}
        self.account: RunAs | None = None
        self.tensorboard: tensorboard.TensorBoard | None = None

    def save(self) -> None:
        self.plan.save(self.job.plan_path)
        if self.on_change is not None:
            self.on_change(self.plan)

    def fail_pending(self, message: str) -> None:
        for step in self.plan.steps:
            if step.status != COMPLETE:
                step.status, step.message = ERROR, " ".join(message.split())
        self.save()

    def run(self) -> Plan:
        todo = [s for s in self.plan.steps if s.status != COMPLETE]
        for step in todo:
            step.status, step.message = STARTING, None
        self.save()
        with contextlib.ExitStack() as stack:
            try:
                self.account = run_as(self.spec.service.user)
                prepared = stack.enter_context(
                    prepare(
                        self.job, self.spec, self.secrets_dir, deadline=self.deadline, account=self.account
                    )
                )
            except LastlayerError as exc:
                self.fail_pending(str(exc))
                return self.plan
            self.shares = prepared.shares
            cluster = _cluster(self.plan)
            if self.spec.service.use_tensorboard:
                self.start_tensorboard(prepared)
                stack.callback(self.stop_tensorboard)
            try:
                for step in todo:
                    self.start(step, prepared, cluster)
                self.save()
                self.watch(prepared)
            except BaseException:  # stopped (SIGTERM) or broken: no task outlives its supervisor
                self.kill_all("stopped")
                self.save()
                raise
        return self.plan

    def group(self, name: str) -> TaskGroupSpec:
        """The options of the task group of task ``name``."""
        group: TaskGroupSpec = getattr(self.spec, ROLE_OF_PREFIX[name.rsplit("-", 1)[0]])
        return group

    def share(self, name: str) -> int:
        """How many tasks' cores and memory task ``name`` gets."""
        return self.shares.get(name, 1)

    def start_tensorboard(self, prepared: Prepared) -> None:
        """Start TensorBoard on the job's log_dir, or say why not."""
        if not tensorboard.installed():
            log.warning(
                "service.use_tensorboard is true but TensorBoard is not installed here: no TensorBoard "
                "runs (install it with `pip install tensorboard`, or set use_tensorboard to false)"
            )
            return
        service = self.spec.service
        task = TaskDescription(
            {}, "tensorboard", 0, "", "", prepared.log_dir, {}, service.log_level, service.user
        )
        self.tensorboard = tensorboard.TensorBoard(
            self.job, {**os.environ, **prepared.env, TASK_ENV: task.to_json()}
        )

    def stop_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.stop()
            self.tensorboard = None

    def sandbox(self, name: str) -> Path:
        """Task ``name``'s folder, private, and its sandbox (the task user's)."""
        folder = self.job.task_dir(name)
        (folder / "sandbox").mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (folder.parent, folder, folder / "sandbox"):
            path.chmod(0o700)
        if self.account is not None:
            let_through(folder.parent, self.account)
            let_through(folder, self.account)
            hand_over(folder / "sandbox", self.account)
        return folder

    def start(self, step: Step, prepared: Prepared, cluster: dict[str, list[str]]) -> None:
        role, index = step.name.rsplit("-", 1)
        group = self.group(step.name)
        folder = self.sandbox(step.name)
        wanted = max(1, math.ceil(group.cpus)) * self.share(step.name)
        cores = sorted(os.sched_getaffinity(0))[:wanted]
        service = self.spec.service
        task = TaskDescription(
            cluster,
            role,
            int(index),
            str(prepared.module_dir),
            service.job_name,
            prepared.log_dir,
            self.spec.context(),
            service.log_level,
            service.user,
            cores,
        )
        env = {
            **os.environ,
            **prepared.env,
            TASK_ENV: task.to_json(),
            "MESOS_SANDBOX": str(folder / "sandbox"),
            "OMP_NUM_THREADS": str(len(cores)),
        }
        if role == "gpuworker":
            env["CUDA_VISIBLE_DEVICES"] = gpus_of(int(index), group.gpus, env.get("CUDA_VISIBLE_DEVICES"))
        out = os.open(folder / "stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(folder / "stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lastlayer.jobs.task"],
                cwd=folder / "sandbox",
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )  # no preexec_fn: Python code between fork and exec can deadlock (at-fork handlers)
        finally:
            os.close(out)
            os.close(err)
        self.procs[step.name] = proc
        step.status, step.pid, step.message, step.exit_code = RUNNING, proc.pid, None, None
        mem = self.mem(step.name)
        log.info("Started %s (pid %d, %d cores, mem %g MiB)", step.name, proc.pid, len(cores), mem)

    def mem(self, name: str) -> float:
        """The memory task ``name`` may use, MiB."""
        return self.group(name).mem * self.share(name)

    def watch(self, prepared: Prepared) -> None:
        while self.procs:
            time.sleep(POLL_S)
            if prepared.mirror is not None:
                prepared.mirror.refresh()  # a renewed ticket, for tasks running as another user
            if self.tensorboard is not None:
                self.tensorboard.poll()
            changed = self.poll()
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.kill_all(f"timed out after {self.timeout:.0f} s (--timeout)")
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
            code = proc.poll()
            if code is None:
                rss, mem = rss_mib(proc.pid), self.mem(name)
                if rss > mem:
                    proc.kill()
                    proc.wait(timeout=STOP_GRACE_S)
                    self.finish(step, ERROR, -9, f"used {rss:.0f} MiB, over its mem of {mem:g} MiB")
                    changed = True
                continue
            if code == 0:
                self.finish(step, COMPLETE, 0, None)
            else:
                reason = last_line(self.job.task_dir(name) / "stderr") or f"exit code {code}"
                self.finish(step, ERROR, code, reason)
            changed = True
        return changed

    def finish(self, step: Step, status: str, code: int | None, message: str | None) -> None:
        message = " ".join(message.split()) if message else None
        step.status, step.exit_code, step.message, step.pid = status, code, message, None
        self.procs.pop(step.name, None)
        log.info("%s: %s%s", step.name, status, f" ({message})" if message else "")

    def workers_done(self) -> bool:
        """Parameter servers serve the workers: once no worker runs, they are stopped."""
        running = set(self.procs)
        return bool(running) and all(n.startswith("ps-") for n in running)

    def kill_all(self, message: str, status: str = ERROR) -> None:
        for name, proc in list(self.procs.items()):
            terminate(proc)
            self.finish(self.plan.step(name), status, proc.returncode, message)


def gpus_of(index: int, gpus: int, visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` of GPU worker ``index`` with ``gpus`` each: its own slice of the GPUs
    this machine shows (of ``visible`` when the service runs with one), in task order."""
    first = index * gpus
    devices = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(first + gpus)]
    return ",".join(devices[first : first + gpus])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster(plan: Plan) -> dict[str, list[str]]:
    """Role -> an address on this machine for each of its steps."""
    cluster: dict[str, list[str]] = {}
    for step in plan.steps:
        role = step.name.rsplit("-", 1)[0]
        cluster.setdefault(role, []).append(f"127.0.0.1:{_free_port()}")
    return cluster


def main(argv: Sequence[str] | None = None) -> int:
    """The detached supervisor: exit 0 when the plan ends COMPLETE, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m lastlayer.jobs.supervisor")
    parser.add_argument("folder", help="The job's state folder.")
    parser.add_argument("--timeout", type=float, default=None, help="Stop the tasks after this many seconds.")
    parser.add_argument("--secrets_dir", default=None, help="The secret store holding the keytab secret.")
    parser.add_argument("--lock_fd", type=int, default=None, help="The job's lock, held for the job's life.")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s:%(name)s:%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    spec, _ = JobSpec.from_dict(json.loads(sys.stdin.buffer.read(MAX_SPEC_BYTES)))
    deadline = None if ns.timeout is None else time.monotonic() + ns.timeout
    plan = supervise(Job(Path(ns.folder)), spec, deadline=deadline, secrets_dir=ns.secrets_dir)
    return 0 if plan.status == COMPLETE else 1


if __name__ == "__main__":
    sys.exit(main())
