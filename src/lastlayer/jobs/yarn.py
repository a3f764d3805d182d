"""The YARN scheduler of the job service: each task in a YARN container, through skein.

:func:`run` prepares what the containers localize (the checked job archive re-zipped, lastlayer's
code, the Hadoop client configuration), starts skein's driver logged in from the keytab secret (the
keytab stays in the job's private folder for the driver's life, as with the local scheduler; the
containers get delegation tokens), submits the application of :mod:`lastlayer.jobs.yarn_spec` and
follows its containers into ``plan.json`` until YARN ends it. ``yarn.json`` keeps the application's id
and each task's container and address; :func:`refresh`, :func:`stop` and :func:`task_log` log in again
from the secret and ask YARN (``plan show``, ``tasks``, ``stop``, ``uninstall``, ``log``), and
:func:`restart` runs steps again in a new application (``plan restart``).

skein's driver runs ``yarn classpath --glob`` to find Hadoop's jars and configuration, and the logs
of an ended application come from ``yarn logs``: Hadoop's ``yarn`` command must be on PATH (the test
harness writes a stand-in, ``DIR/bin/yarn``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lastlayer import storage
from lastlayer.engines.shipping import package_zip
from lastlayer.errors import LastlayerError, StorageError, UsageError
from lastlayer.jobs.package import build_zip
from lastlayer.jobs.plan import COMPLETE, ERROR, PENDING, RUNNING, STARTING, Plan, Step
from lastlayer.jobs.prepare import cluster_login, extract_job, private_dir, remaining
from lastlayer.jobs.spec import JobSpec
from lastlayer.jobs.state import Job
from lastlayer.jobs.yarn_spec import ADDRESS_PREFIX, YarnInputs, application_spec

if TYPE_CHECKING:
    import skein

log = logging.getLogger(__name__)

#: How often YARN is asked about the application, seconds.
POLL_S = 1.0
#: Longest wait for ``yarn logs`` to give a log (YARN collects them once the application has ended), s.
LOGS_TIMEOUT_S = 120.0
#: Pause between two tries of ``yarn logs``, seconds.
LOGS_RETRY_S = 2.0
#: skein's container states -> the plan's step statuses.
STATUS_OF = {
    "WAITING": PENDING,
    "REQUESTED": STARTING,
    "RUNNING": RUNNING,
    "SUCCEEDED": COMPLETE,
    "FAILED": ERROR,
    "KILLED": ERROR,
}
#: YARN's application states once it has ended.
FINAL_STATES = ("FINISHED", "FAILED", "KILLED")
#: The task groups whose end ends the job (parameter servers serve them).
WORKER_ROLES = ("worker", "gpuworker")


@dataclass(frozen=True)
class Login:
    """How skein's driver logs in: ``principal`` and ``keytab`` (both empty: the ticket cache) with
    ``krb5_conf``, and the environment of the login (``KRB5CCNAME``, ``KRB5_CONFIG``, ...)."""

    principal: str = ""
    keytab: str = ""
    krb5_conf: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def java_options(self) -> list[str]:
        return [f"-Djava.security.krb5.conf={self.krb5_conf}"] if self.krb5_conf else []


@dataclass
class AppRecord:
    """``yarn.json``: the job's YARN application, when it was submitted (``time.time()``), the packed
    Python it localizes (``--yarn_env``), the container and the published address of each task, and,
    for a restart, the indexes of the tasks it runs again, by role."""

    app_id: str
    submitted: float
    yarn_env: str
    containers: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    indexes: dict[str, list[int]] | None = None

    def task_of(self, service: str, instance: int) -> str:
        """The task skein's container ``<service>_<instance>`` runs."""
        return f"{service}-{instance if self.indexes is None else self.indexes[service][instance]}"

    def save(self, job: Job) -> None:
        storage.write_private(job.folder / "yarn.json", json.dumps(dataclasses.asdict(self)).encode())

    @classmethod
    def load(cls, job: Job) -> AppRecord | None:
        """The record, or ``None`` for a job of the local scheduler (or one not submitted yet)."""
        path = job.folder / "yarn.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


def check(spec: JobSpec, env_archive: str) -> None:
    """What the YARN scheduler cannot do with these options, before anything is touched.

    Raises:
        UsageError: no ``--yarn_env``, or ``service.user`` set (YARN runs the containers as the
            principal's user).
    """
    if not env_archive:
        raise UsageError(
            "--scheduler=yarn needs --yarn_env: the URL of the tasks' packed Python on HDFS (build it "
            "with `python scripts/yarn_archives.py OUT --job` and upload lastlayer-job-env.tar.gz)"
        )
    if spec.service.user:
        raise UsageError(
            f"service.user is {spec.service.user!r}, but on YARN the containers run as the Kerberos "
            "principal's user: leave service.user empty with --scheduler=yarn"
        )


@contextlib.contextmanager
def _login(job: Job, spec: JobSpec, secrets_dir: str | None, deadline: float | None) -> Iterator[Login]:
    """The job's login from its keytab secret (as the local scheduler's), for one ``with`` block."""
    private = private_dir(job.folder / "private")
    with cluster_login(spec, private, secrets_dir, deadline) as env:
        k = spec.service.security.kerberos
        if not k.enabled:
            yield Login(env=env)
            return
        yield Login(f"{k.primary}@{k.realm}", str(private / "keytab"), env.get("KRB5_CONFIG", ""), env)


def _inputs(job: Job, spec: JobSpec, env_archive: str, login: Login, deadline: float | None) -> YarnInputs:
    """The job archive fetched and checked as the local scheduler does, then re-zipped with lastlayer's
    code and the Hadoop configuration into ``yarn/`` for the containers."""
    extract_job(job, spec, deadline)
    staged = private_dir(job.folder / "yarn")
    job_zip = str(staged / "job.zip")
    build_zip(job.folder / "job", job_zip)
    conf = ""
    if login.env.get("HADOOP_CONF_DIR"):
        conf = str(staged / "hadoop-conf.zip")
        build_zip(login.env["HADOOP_CONF_DIR"], conf)
    return YarnInputs(env_archive, job_zip, str(package_zip(staged)), conf)


def client(login: Login, log_path: Path) -> skein.Client:
    """A skein client with its own driver (a JVM) logged in as ``login``; in-memory TLS credentials
    (nothing written to ``~/.skein``)."""
    import skein

    try:
        return skein.Client(
            principal=login.principal or None,
            keytab=login.keytab or None,
            security=skein.Security.new_credentials(),
            java_options=login.java_options(),
            log=str(log_path),
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:  # running `yarn classpath`
        raise UsageError(
            f"cannot run Hadoop's `yarn classpath` for skein's driver ({exc}): put the `yarn` command "
            "of the cluster's Hadoop client on PATH"
        ) from None
    except skein.exceptions.DriverError as exc:
        raise UsageError(f"skein's driver did not start ({exc}): see {log_path}") from None


def run(
    job: Job,
    spec: JobSpec,
    env_archive: str,
    *,
    deadline: float | None = None,
    on_change: Callable[[Plan], None] | None = None,
    secrets_dir: str | None = None,
) -> Plan:
    """Run the job's tasks on YARN to the end; the final plan. A failure before the application
    runs makes every step ERROR with its one-line reason."""
    plan = job.plan()
    record = AppRecord("", 0.0, env_archive)
    steps = [s.name for s in plan.steps]
    return _launch(job, spec, plan, record, steps, deadline, on_change, secrets_dir)


def restart(
    job: Job,
    step: str | None,
    *,
    deadline: float | None = None,
    on_change: Callable[[Plan], None] | None = None,
    secrets_dir: str | None = None,
) -> Plan:
    """Run ``step`` (``None``: every step not COMPLETE) again, in a new YARN application of just
    those tasks; the other tasks' addresses, as they published them, go into its key-value store, so
    ``server.cluster`` still names every task.

    Raises:
        UsageError: no such step.
    """
    before = AppRecord.load(job)
    plan = job.plan()
    names = [s.name for s in plan.steps]
    if before is None or (step is not None and step not in names):
        raise UsageError(f"no step {step!r} in the plan of {job.name!r}; steps: {', '.join(names)}")
    chosen = [s.name for s in plan.steps if (step is None and s.status != COMPLETE) or s.name == step]
    indexes: dict[str, list[int]] = {}
    for name in chosen:
        role, index = name.rsplit("-", 1)
        indexes.setdefault(role, []).append(int(index))
        plan.step(name).restarts += 1
    kept = {task: address for task, address in before.addresses.items() if task not in chosen}
    record = AppRecord("", 0.0, before.yarn_env, addresses=kept, indexes=indexes)
    return _launch(job, job.spec(), plan, record, chosen, deadline, on_change, secrets_dir)


def _launch(
    job: Job,
    spec: JobSpec,
    plan: Plan,
    record: AppRecord,
    steps: list[str],
    deadline: float | None,
    on_change: Callable[[Plan], None] | None,
    secrets_dir: str | None,
) -> Plan:
    """Submit the application of ``steps`` (all of the plan's, or a restart's) and follow it."""
    import skein

    job.save_pid(os.getpid())
    try:
        with (
            _login(job, spec, secrets_dir, deadline) as login,
            client(login, job.folder / "yarn-driver.log") as yarn,
        ):
            inputs = _inputs(job, spec, record.yarn_env, login, deadline)
            record.app_id = yarn.submit(application_spec(spec, inputs, record.indexes))
            record.submitted = time.time()
            record.save(job)
            log.info("Submitted %s to YARN", record.app_id)
            try:
                return _Watch(yarn, record, job, plan, on_change).until_end(deadline, steps)
            except BaseException:
                yarn.kill_application(record.app_id)
                raise
    except (LastlayerError, skein.exceptions.SkeinError) as exc:
        _Watch.mark(plan, " ".join(str(exc).split()), steps)
        plan.save(job.plan_path)
        return plan
    finally:
        job.pid_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _session(job: Job, secrets_dir: str | None) -> Iterator[tuple[skein.Client, AppRecord, Login]]:
    """A skein client logged in as the job (from its keytab secret) and the job's application."""
    record = AppRecord.load(job)
    if record is None:
        raise UsageError(f"job {job.name!r} has no YARN application (yet): nothing to ask YARN")
    with (
        _login(job, job.spec(), secrets_dir, None) as login,
        client(login, job.folder / "yarn-driver.log") as yarn,
    ):
        yield yarn, record, login


def refresh(job: Job, secrets_dir: str | None = None) -> Plan:
    """The plan as YARN sees the application and its containers now (saved)."""
    with _session(job, secrets_dir) as (yarn, record, _):
        watch = _Watch(yarn, record, job, job.plan(), None)
        watch.look()
        return watch.plan


def stop(job: Job, secrets_dir: str | None = None) -> Plan:
    """Kill the job's YARN application unless it has ended; the plan, unfinished steps ERROR
    (stopped)."""
    with _session(job, secrets_dir) as (yarn, record, _):
        if str(yarn.application_report(record.app_id).state) not in FINAL_STATES:
            yarn.kill_application(record.app_id)
    plan = job.plan()
    _Watch.mark(plan, "stopped")
    plan.save(job.plan_path)
    return plan


def task_log(job: Job, task: str, secrets_dir: str | None = None) -> str:
    """Task ``task``'s container log (stdout and stderr together, skein's ``<role>.log``) through
    ``yarn logs``, logged in as the job (YARN aggregates a container's log once it has ended).

    Raises:
        UsageError: the job has no YARN application, or YARN placed no container for the task.
    """
    record = AppRecord.load(job)
    if record is None:
        raise UsageError(f"job {job.name!r} has no YARN application (yet): no container logs")
    container = record.containers.get(task)
    if container is None:
        raise UsageError(f"task {task} got no YARN container in {record.app_id}: it has no log")
    role = task.rsplit("-", 1)[0]
    argv = ["yarn", "logs", "-applicationId", record.app_id, "-containerId", container]
    with _login(job, job.spec(), secrets_dir, None) as login:
        return _yarn_logs([*argv, "-log_files", f"{role}.log"], {**os.environ, **login.env})


def _yarn_logs(argv: list[str], env: dict[str, str]) -> str:
    """The output of ``yarn logs ...``; the NodeManagers collect an application's logs after it ends,
    so a failure is tried again until :data:`LOGS_TIMEOUT_S`.

    Raises:
        StorageError: ``yarn logs`` still fails then (its last message).
    """
    deadline = time.monotonic() + LOGS_TIMEOUT_S
    while True:
        left = max(1.0, deadline - time.monotonic())
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=left, check=False)
        if done.returncode == 0 and "LogContents:" in done.stdout:
            return done.stdout
        if time.monotonic() > deadline:
            raise StorageError(
                f"`{' '.join(argv)}` gave no log within {LOGS_TIMEOUT_S:.0f} s: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        time.sleep(LOGS_RETRY_S)


class _Watch:
    """Follows an application's containers into the job's plan and record."""

    def __init__(
        self,
        yarn: skein.Client,
        record: AppRecord,
        job: Job,
        plan: Plan,
        on_change: Callable[[Plan], None] | None,
    ) -> None:
        self.yarn, self.record, self.job, self.plan, self.on_change = yarn, record, job, plan, on_change
        self.app: skein.ApplicationClient | None = None

    def save(self) -> None:
        self.plan.save(self.job.plan_path)
        self.record.save(self.job)
        if self.on_change is not None:
            self.on_change(self.plan)

    def until_end(self, deadline: float | None, steps: list[str]) -> Plan:
        """Follow the application running ``steps`` until it ends (or ``deadline``, when it is
        killed)."""
        self.mark(self.plan, None, steps, status=STARTING)
        self.save()
        while str(self.look().state) not in FINAL_STATES:
            left = remaining(deadline)
            if left is not None and left <= 0:
                self.yarn.kill_application(self.record.app_id)
                self.mark(self.plan, "timed out (--timeout): the YARN application was killed")
                self.save()
                break
            time.sleep(POLL_S)
        return self.plan

    def look(self) -> skein.ApplicationReport:
        """One look at the application and, while it runs, its containers; the plan saved when it
        changed."""
        report = self.yarn.application_report(self.record.app_id)
        state = str(report.state)
        if state in FINAL_STATES:
            self.finish(str(report.final_status), report.diagnostics)
        elif state == "RUNNING" and self.follow_containers():
            self.save()
        return report

    def follow_containers(self) -> bool:
        """Read the containers' states; stop the parameter servers once the workers are done."""
        import skein

        try:
            if self.app is None:
                self.app = self.yarn.connect(self.record.app_id, wait=False)
            containers = self.app.get_containers(states=list(STATUS_OF))
            published = self.publish()
        except skein.exceptions.ConnectionError:
            return False  # the application master is not up, or has just ended: its report will say
        changed = [
            self.update(c, self.record.task_of(c.service_name, c.instance) in published) for c in containers
        ]
        if self.workers_done():
            self.app.shutdown("SUCCEEDED", "the workers finished")
        return any(changed)

    def publish(self) -> set[str]:
        """The tasks whose address the application's key-value store holds, after putting there
        those the record knows and it lacks (a restart's tasks not run again)."""
        assert self.app is not None
        found = {
            k.removeprefix(ADDRESS_PREFIX): v.decode()
            for k, v in self.app.kv.get_prefix(ADDRESS_PREFIX).items()
        }
        for task, address in self.record.addresses.items():
            if task not in found:
                self.app.kv[f"{ADDRESS_PREFIX}{task}"] = address.encode()
        self.record.addresses.update(found)
        return set(found)

    def update(self, container: skein.Container, started: bool) -> bool:
        """Fold one container's state into its step (RUNNING once its task has ``started``: it
        published its address; STARTING while YARN localizes and starts it); whether the step
        changed."""
        name = self.record.task_of(container.service_name, container.instance)
        step = self.plan.step(name)
        status = STATUS_OF[str(container.state)]
        message = None
        if status == RUNNING and not started:
            status, message = STARTING, f"{container.yarn_container_id} on {container.yarn_node_http_address}"
        elif status == RUNNING:
            message = f"{container.yarn_container_id} on {container.yarn_node_http_address}"
        elif status == ERROR:
            message = container.exit_message or f"container {str(container.state).lower()}"
        if container.yarn_container_id:
            self.record.containers[name] = container.yarn_container_id
        before = (step.status, step.message)
        step.status, step.message = status, message
        return before != (step.status, step.message)

    def workers_done(self) -> bool:
        """Whether every worker has ended COMPLETE while a parameter server still runs."""

        def role(step: Step) -> str:
            return step.name.rsplit("-", 1)[0]

        workers = [s for s in self.plan.steps if role(s) in WORKER_ROLES]
        serving = [s for s in self.plan.steps if role(s) not in WORKER_ROLES and s.status == RUNNING]
        return bool(serving) and all(s.status == COMPLETE for s in workers)

    def finish(self, final_status: str, diagnostics: str) -> None:
        """The application has ended: steps whose end was not seen take its final status."""
        if final_status == "SUCCEEDED":
            for step in self.plan.steps:
                if step.status not in (COMPLETE, ERROR):
                    step.status, step.message = COMPLETE, _ps_message(step)
        else:
            reason = " ".join((diagnostics or f"application {final_status}").split())
            self.mark(self.plan, f"{reason} (`lastlayer job log TASK` shows each task's log)")
        self.save()

    @staticmethod
    def mark(plan: Plan, message: str | None, steps: list[str] | None = None, status: str = ERROR) -> None:
        """The steps named (``None``: those not ended) take ``status`` and ``message``."""
        for step in plan.steps:
            if (step.name in steps) if steps is not None else step.status not in (COMPLETE, ERROR):
                step.status, step.message, step.exit_code, step.pid = status, message, None, None


def _ps_message(step: Step) -> str | None:
    """Why a parameter server ended COMPLETE: the workers it served finished."""
    return "stopped: the workers finished" if step.name.startswith("ps-") and step.status == RUNNING else None
