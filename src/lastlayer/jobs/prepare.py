"""Everything before a job's tasks start, in the job's state folder.

Checks the machine (a GPU for tasks asking for one, free disk for the groups' ``disk``), downloads
the Hadoop configuration and logs in to Kerberos from the keytab secret (:func:`cluster_login`),
fetches and extracts the job archive, and asks the job module how its workers run
(:func:`_executors`). Kerberos tracing (``kerberos.debug``) goes to each task's stderr.

Every download is bounded in bytes and in wall time by its options (``service.job_url_max_bytes``
and ``service.job_url_timeout``; ``service.hdfs.config_max_bytes`` and
``service.hdfs.config_timeout``) and by what is left of the deploy's ``--timeout``, which counts from
the start; each message names the setting that stopped it. When the tasks run as another user
(``service.user``), what they must reach is handed to that user (:func:`_hand_over`).

When the job module answers ``executors(context) == "spark"`` (the example job does when its context
asks for ``--engine spark``), the workers become Spark executors: ``private/spark-conf/
spark-defaults.conf`` (``SPARK_CONF_DIR`` of every task) gets ``spark.executor.instances`` =
``worker.count``, ``spark.executor.cores`` = ``worker.cpus`` (rounded up), ``spark.executor.memory``
= ``worker.mem`` and, unless a master is configured already, ``spark.master`` = ``local[count x
cpus]`` for this one machine; worker-0 is the Spark driver and gets all those cores and ``count x
mem``. A ``--spark_master`` in the context (``yarn``, ``k8s://...``) wins over that master and keeps
the executor settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lastlayer import storage
from lastlayer.engines.spark import configured_master
from lastlayer.errors import DataError, StorageError, UsageError
from lastlayer.fetch import Limits, shown
from lastlayer.hadoop import ClusterConfig, HadoopLogin
from lastlayer.hadoop import config as hadoop_config
from lastlayer.jobs import archive, secret_store
from lastlayer.jobs.plan import PHASES
from lastlayer.jobs.spec import JobSpec
from lastlayer.jobs.state import Job, make_private, masked_urls
from lastlayer.jobs.task import TASK_ENV, TaskDescription
from lastlayer.jobs.user import Mirror, RunAs, hand_over, let_through

log = logging.getLogger(__name__)

#: What a job module's ``executors(context)`` may answer besides ``None``.
EXECUTORS = ("spark",)
#: Longest wait for the job module's answer (importing it included), seconds.
EXECUTORS_TIMEOUT_S = 120.0
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Prepared:
    """What the tasks are started with.

    Attributes:
        env: added to every task's environment (Kerberos cache, Hadoop and Spark configuration).
        module_dir: the folder holding the job module.
        log_dir: the tasks' ``log_dir``.
        shares: task name -> how many tasks' cores and memory it gets (the Spark driver: every
            worker's); 1 for the tasks not named.
        mirror: the copies of private files that tasks running as another user read (refreshed by
            the supervisor), or ``None``.
    """

    env: dict[str, str]
    module_dir: Path
    log_dir: str
    shares: dict[str, int] = field(default_factory=dict)
    mirror: Mirror | None = None


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (``time.monotonic()`` based; ``None``: no deadline)."""
    return None if deadline is None else deadline - time.monotonic()


def limits(max_bytes: int, seconds: float, settings: tuple[str, str], deadline: float | None) -> Limits:
    """The bounds of one download: ``seconds`` or what is left of the deploy's ``--timeout``, whichever
    ends first, each named by its setting in messages.

    Raises:
        StorageError: the deploy's ``--timeout`` has passed already.
    """
    left = remaining(deadline)
    if left is None or left >= seconds:
        return Limits(max_bytes, seconds, *settings)
    if left <= 0:
        raise StorageError("the deploy's --timeout passed before the downloads: allow a longer --timeout")
    return Limits(max_bytes, left, settings[0], "--timeout")


@contextmanager
def prepare(
    job: Job,
    spec: JobSpec,
    secrets_dir: str | None = None,
    *,
    deadline: float | None = None,
    account: RunAs | None = None,
) -> Iterator[Prepared]:
    """Prepare the job's tasks; the login lasts as long as the ``with`` block.

    Args:
        secrets_dir: the secret store holding ``keytab_secret`` (default: see
            :func:`lastlayer.jobs.secret_store.store_dir`).
        deadline: when the deploy's ``--timeout`` ends (``time.monotonic()``), bounding the downloads.
        account: the user the tasks run as when not this process's.

    Raises:
        LastlayerError: with a one-line reason (no GPU or disk, a missing secret, a failed login,
            an unreadable or oversized download, a failing ``executors(context)``).
    """
    _check_gpu(spec)
    _check_disk(job, spec)
    if "shared_filesystem" in masked_urls(spec.service):
        raise _not_kept("service.shared_filesystem", spec.service.shared_filesystem)
    private = private_dir(job.folder / "private")
    with cluster_login(spec, private, secrets_dir, deadline) as env:
        if spec.service.security.kerberos.debug:
            env["KRB5_TRACE"] = "/dev/stderr"  # MIT Kerberos traces into each task's stderr file
        module_dir = extract_job(job, spec, deadline)
        log_dir = spec.service.shared_filesystem or str(job.folder / "persist")
        if not spec.service.shared_filesystem:
            private_dir(job.folder / "persist")
        mirror = None
        if account is not None:
            _hand_over(job, account)
            mirror = Mirror(private, job.folder / "task-private", account)
        shares: dict[str, int] = {}
        if _executors(job, spec, module_dir, mirror.env(env) if mirror else env, deadline) == "spark":
            conf = private_dir(private / "spark-conf")
            storage.write_private(conf / "spark-defaults.conf", spark_defaults(spec).encode())
            env["SPARK_CONF_DIR"] = str(conf)
            shares["worker-0"] = spec.worker.count
        yield Prepared(mirror.env(env) if mirror else env, module_dir, log_dir, shares, mirror)


def gpu_available() -> bool:
    """Whether this machine shows an NVIDIA GPU."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _check_gpu(spec: JobSpec) -> None:
    """Tasks asking for GPUs (``gpu_worker``, or any group's ``gpus``) need a machine that has one."""
    if gpu_available():
        return
    if spec.gpu_worker.count > 0:
        raise UsageError(
            f"gpu_worker.count is {spec.gpu_worker.count} but this machine has no GPU "
            "(no /dev/nvidia0, no nvidia-smi): set gpu_worker.count to 0"
        )
    for _, group, _ in PHASES:
        tasks = getattr(spec, group)
        if tasks.count > 0 and tasks.gpus > 0:
            raise UsageError(
                f"{group}.gpus is {tasks.gpus} but this machine has no GPU "
                f"(no /dev/nvidia0, no nvidia-smi): set {group}.gpus to 0"
            )


def _check_disk(job: Job, spec: JobSpec) -> None:
    """The groups' ``disk`` (MiB per task) must be free where the tasks' sandboxes go."""
    asked = {group: getattr(spec, group).count * getattr(spec, group).disk for _, group, _ in PHASES}
    need = sum(asked.values())
    if need <= 0:
        return
    free = shutil.disk_usage(job.folder).free / _MIB
    if free < need:
        given = " + ".join(f"{group}.disk x {group}.count" for group, mib in asked.items() if mib > 0)
        raise UsageError(
            f"the tasks ask for {need:g} MiB of disk ({given}) but {job.folder} has {free:.0f} MiB free: "
            "free some space, lower disk, or deploy with another --state_dir"
        )


def private_dir(folder: Path) -> Path:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def krb5_conf(spec: JobSpec) -> str:
    """The ``krb5.conf`` of the job's realm and KDC."""
    k = spec.service.security.kerberos
    return (
        f"[libdefaults]\n default_realm = {k.realm}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n"
        f" rdns = false\n dns_canonicalize_hostname = false\n udp_preference_limit = 1\n"
        f"[realms]\n {k.realm} = {{\n  kdc = {k.kdc.hostname}:{k.kdc.port}\n }}\n"
    )


@contextmanager
def cluster_login(
    spec: JobSpec, private: Path, secrets_dir: str | None, deadline: float | None
) -> Iterator[dict[str, str]]:
    """The job's :class:`~lastlayer.hadoop.HadoopLogin`: as ``primary@realm`` from the keytab secret
    with a private krb5.conf when Kerberos is enabled, and the Hadoop configuration of
    ``hdfs.config_uri`` (downloaded, bounded and checked, into ``private/hadoop-config``); yields the
    tasks' environment for it. The login renews its ticket until the block ends; then the job's
    copy of the keytab is removed."""
    k = spec.service.security.kerberos
    keytab = private / "keytab"
    try:
        config = ClusterConfig()
        if spec.service.hdfs.config_uri:
            config = dataclasses.replace(config, hadoop_conf_dir=str(_hadoop_conf(spec, private, deadline)))
        if k.enabled:
            conf = private / "krb5.conf"
            storage.write_private(keytab, secret_store.read_secret(k.keytab_secret, secrets_dir))
            storage.write_private(conf, krb5_conf(spec).encode())
            config = dataclasses.replace(
                config, principal=f"{k.primary}@{k.realm}", keytab=str(keytab), krb5_conf=str(conf)
            )
        if config == ClusterConfig():
            yield {}
            return
        with HadoopLogin(config, folder=str(private)) as login:
            yield dict(login.env())
    finally:
        keytab.unlink(missing_ok=True)


def _hadoop_conf(spec: JobSpec, private: Path, deadline: float | None) -> Path:
    """core-site.xml and hdfs-site.xml from ``hdfs.config_uri`` into ``private/hadoop-config``, each
    bounded and checked to be a Hadoop configuration before it lands; a restart whose URL's password
    was not kept uses the files of the deploy."""
    hdfs = spec.service.hdfs
    folder = private / "hadoop-config"
    if masked_urls(hdfs):
        return _earlier(folder, "service.hdfs.config_uri", hdfs.config_uri)
    private_dir(folder)
    bounds = limits(
        hdfs.config_max_bytes,
        hdfs.config_timeout,
        ("service.hdfs.config_max_bytes", "service.hdfs.config_timeout"),
        deadline,
    )
    hadoop_config.download(hdfs.config_uri, str(folder), bounds)
    return folder


def _not_kept(option: str, url: str) -> UsageError:
    return UsageError(
        f"{option} {url} needs a password, which is not kept with the job: deploy it again with "
        "`lastlayer job deploy OPTIONS`"
    )


def _earlier(path: Path, option: str, url: str) -> Path:
    """What the deploy fetched from ``url``, whose password the stored options do not keep."""
    if not path.exists():
        raise _not_kept(option, url)
    log.info("%s: using what the deploy fetched (the URL's password is not kept)", shown(url))
    return path


def extract_job(job: Job, spec: JobSpec, deadline: float | None) -> Path:
    """Fetch and extract the job archive into ``job/`` (owner-only); returns the job module's folder."""
    service = spec.service
    extracted = job.folder / "job"
    if "job_url" in masked_urls(service):
        _earlier(extracted, "service.job_url", service.job_url)
    else:
        bounds = limits(
            service.job_url_max_bytes,
            service.job_url_timeout,
            ("service.job_url_max_bytes", "service.job_url_timeout"),
            deadline,
        )
        archive.fetch_and_extract(
            service.job_url,
            str(extracted),
            max_bytes=service.job_url_max_bytes,
            timeout=bounds.seconds,
            settings=(bounds.bytes_setting, bounds.seconds_setting),
            replace=True,
        )
        make_private(extracted)
    module_dir = extracted / service.job_path
    if not module_dir.is_dir():
        top = sorted(p.relative_to(extracted).as_posix() for p in extracted.glob("*/*") if p.is_dir())
        raise UsageError(
            f"service.job_path {service.job_path!r} is not a folder of the archive "
            f"{shown(service.job_url)}; it holds: {', '.join(top[:20]) or 'no folders'}"
        )
    return module_dir


def _hand_over(job: Job, account: RunAs) -> None:
    """Let ``account`` reach the job's folder (0710 to its group) and own the job's code and
    ``persist/``; every other file stays the service's own."""
    let_through(job.folder, account)
    for part in ("job", "persist"):
        if (job.folder / part).exists():
            hand_over(job.folder / part, account)


def _executors(
    job: Job, spec: JobSpec, module_dir: Path, env: dict[str, str], deadline: float | None
) -> str | None:
    """The job module's answer to ``executors(context)``, asked in a process of its own (no job code
    runs in the supervisor; it runs as ``service.user``); ``None`` when it has no such function or
    cannot be loaded (its tasks then say why).

    Raises:
        DataError: the function fails, answers something else than ``None`` or one of
            :data:`EXECUTORS`, or gives no answer within :data:`EXECUTORS_TIMEOUT_S` (or the
            deploy's ``--timeout``).
    """
    name = spec.service.job_name
    service = spec.service
    ask = TaskDescription(
        {}, "worker", 0, str(module_dir), name, "", spec.context(), service.log_level, service.user
    )
    left = remaining(deadline)
    timeout = EXECUTORS_TIMEOUT_S if left is None else max(0.1, min(EXECUTORS_TIMEOUT_S, left))
    with tempfile.TemporaryFile(dir=job.folder / "private") as answer:  # 0600, unnamed
        try:
            subprocess.run(
                [sys.executable, "-m", "lastlayer.jobs.task", "--executors", str(answer.fileno())],
                env={**os.environ, **env, TASK_ENV: ask.to_json()},
                cwd=job.folder,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                pass_fds=(answer.fileno(),),
            )
        except subprocess.TimeoutExpired:
            raise DataError(
                f"job module {name!r} gave no answer to executors(context) within {round(timeout, 1):g} s "
                "(importing it included): make importing it and that function quick"
            ) from None
        answer.seek(0)
        return _chosen(name, answer.read())


def _chosen(name: str, text: bytes) -> str | None:
    """The checked answer of ``executors(context)`` (``text``: what the asking process wrote)."""
    try:
        result = json.loads(text) if text else {"executors": None}
    except ValueError:
        result = {"executors": None}  # cut short: the tasks will say what is wrong
    if "error" in result:
        raise DataError(f"job module {name!r}: executors(context) failed: {result['error']}")
    chosen = result.get("executors")
    if chosen is not None and chosen not in EXECUTORS:
        raise DataError(
            f"job module {name!r}: executors(context) answered {chosen!r}; answer None (one process per "
            f"worker) or one of: {', '.join(EXECUTORS)}"
        )
    if chosen:
        log.info("Job module %s: the workers run as %s executors driven by worker-0", name, chosen)
    return chosen


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
