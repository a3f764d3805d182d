"""The skein application of a job on YARN, built purely from its options (no YARN, no files touched).

One skein service per task group of the options file (``worker``, ``ps``, ``gpuworker``, named as
the tasks' prefixes) with ``instances`` = the group's ``count`` and one container per task, sized by
``mem`` (MiB), ``cpus`` (vcores, rounded up) and ``gpus`` (YARN's ``yarn.io/gpu`` resource, which the
cluster's NodeManagers must declare). Every container localizes from HDFS the packed Python
(``./env``, the ``--yarn_env`` archive), the job archive (``./job``, extracted by YARN), lastlayer's
own code (``./lastlayer.zip``) and the Hadoop client configuration of ``service.hdfs.config_uri``
(``./hadoop-conf``), then runs :mod:`lastlayer.jobs.container`, which publishes its address and
starts the local scheduler's task entry point (:mod:`lastlayer.jobs.task`). No file holds the keytab:
skein's driver logs in from it and YARN hands the containers delegation tokens.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import skein

from lastlayer.jobs.plan import PHASES
from lastlayer.jobs.spec import JobSpec
from lastlayer.jobs.task import TaskDescription

#: Environment of a container: its task's description without index and cluster (:func:`encode`d).
TEMPLATE_ENV = "LASTLAYER_YARN_TASK"
#: Environment of a container: the role counts its task waits for (``{"worker": 2, ...}``, encoded).
PEERS_ENV = "LASTLAYER_YARN_PEERS"
#: Environment of a restart's containers: role -> the indexes of its tasks run again (encoded); the
#: container of skein's instance ``n`` runs the ``n``-th.
INDEXES_ENV = "LASTLAYER_YARN_INDEXES"
#: The key-value store's keys of the tasks' addresses start with this (``address/worker-0``).
ADDRESS_PREFIX = "address/"
#: Where a container finds what is localized, relative to its working folder.
ENV_DIR, JOB_DIR, CODE_ZIP, CONF_DIR = "env", "job", "lastlayer.zip", "hadoop-conf"
#: The application master's (skein's own) memory, MiB, and vcores.
MASTER_MEMORY_MIB, MASTER_VCORES = 512, 1
#: A Hadoop file system named in a URL: its scheme and authority.
FILE_SYSTEM = re.compile(r"\b(hdfs|viewfs|webhdfs|swebhdfs)://([^/\s\"'{}]+)")
#: The application's type in YARN (``yarn application -appTypes``).
APPLICATION_TYPE = "lastlayer"
#: What each container runs: the packed Python with lastlayer's code first on its path.
SCRIPT = (
    f'export PYTHONPATH="$PWD/{CODE_ZIP}" MESOS_SANDBOX="$PWD"\n'
    f'[ -d "{CONF_DIR}" ] && export HADOOP_CONF_DIR="$PWD/{CONF_DIR}"\n'
    f"exec ./{ENV_DIR}/bin/python -m lastlayer.jobs.container\n"
)


@dataclass(frozen=True)
class YarnInputs:
    """What the containers localize.

    Attributes:
        env_archive: URL of the packed Python (``scripts/yarn_archives.py --job``), on HDFS.
        job_zip: the checked job archive (a local path: skein uploads it to the application's
            staging folder on HDFS, from where YARN localizes it).
        code_zip: lastlayer's code (a local path, uploaded likewise).
        hadoop_conf: a zip of the Hadoop client configuration (a local path; ``""``: none).
    """

    env_archive: str
    job_zip: str
    code_zip: str
    hadoop_conf: str = ""


def encode(data: object) -> str:
    """``data`` as JSON in URL-safe base64: YARN writes environment values into the container's launch
    script between double quotes, unescaped, and expands ``{{...}}`` in them (the walkthrough's
    ``{{shared_filesystem}}``), so JSON cannot be passed as it is."""
    return base64.urlsafe_b64encode(json.dumps(data, sort_keys=True).encode()).decode()


def decode(text: str) -> Any:
    """What :func:`encode` encoded."""
    return json.loads(base64.urlsafe_b64decode(text.encode()))


def file_systems(spec: JobSpec) -> list[str]:
    """The Hadoop file systems the job names (``hdfs://NAME`` in ``shared_filesystem`` and in the
    context's values), for which the containers get delegation tokens besides the default one's: a
    token is for one file system, and ``hdfs://default`` (a nameservice) is not the default
    ``hdfs://host:port`` even when it is the same NameNode."""
    texts = [spec.service.shared_filesystem, json.dumps(spec.context())]
    found = {f"{m[0]}://{m[1]}" for text in texts for m in FILE_SYSTEM.findall(text)}
    return sorted(found)


def counts(spec: JobSpec) -> dict[str, int]:
    """Task prefix (= skein service) -> how many tasks of it the options file asks for."""
    return {prefix: getattr(spec, group).count for _, group, prefix in PHASES}


def task_template(spec: JobSpec, role: str) -> TaskDescription:
    """The task description of role ``role`` that each container completes with its index and the
    containers' addresses; the job module's folder is relative to the container's."""
    service = spec.service
    return TaskDescription(
        {},
        role,
        0,
        f"{JOB_DIR}/{service.job_path}".rstrip("/"),
        service.job_name,
        service.shared_filesystem or "persist",
        spec.context(),
        service.log_level,
    )


def resources(spec: JobSpec, group: str) -> skein.Resources:
    """A container of task group ``group``: its ``mem`` (MiB, rounded up), ``cpus`` (vcores, rounded
    up) and ``gpus``."""
    tasks = getattr(spec, group)
    return skein.Resources(memory=math.ceil(tasks.mem), vcores=max(1, math.ceil(tasks.cpus)), gpus=tasks.gpus)


def files(inputs: YarnInputs) -> dict[str, skein.File]:
    """Every container's localized files, by the name they get in its working folder."""
    found = {
        ENV_DIR: skein.File(inputs.env_archive, type="archive"),
        JOB_DIR: skein.File(inputs.job_zip, type="archive"),
        CODE_ZIP: skein.File(inputs.code_zip, type="file"),
    }
    if inputs.hadoop_conf:
        found[CONF_DIR] = skein.File(inputs.hadoop_conf, type="archive")
    return found


def application_spec(
    spec: JobSpec, inputs: YarnInputs, indexes: dict[str, list[int]] | None = None
) -> skein.ApplicationSpec:
    """The skein application running every task of ``spec`` in a container of its own; with
    ``indexes`` (a restart), only those tasks of each role."""
    peers = encode(counts(spec))
    services = {}
    for _, group, prefix in PHASES:
        count = getattr(spec, group).count if indexes is None else len(indexes.get(prefix, []))
        if count == 0:
            continue
        env = {TEMPLATE_ENV: encode(dataclasses.asdict(task_template(spec, prefix))), PEERS_ENV: peers}
        if indexes is not None:
            env[INDEXES_ENV] = encode(indexes)
        services[prefix] = skein.Service(
            instances=count,
            resources=resources(spec, group),
            files=files(inputs),
            env=env,
            script=SCRIPT,
            max_restarts=0,
        )
    return skein.ApplicationSpec(
        name=f"lastlayer-{spec.service.name}",
        queue="default",
        tags=[APPLICATION_TYPE, f"service:{spec.service.name}"],
        master=skein.Master(resources=skein.Resources(memory=MASTER_MEMORY_MIB, vcores=MASTER_VCORES)),
        services=services,
        file_systems=file_systems(spec),
        max_attempts=1,
    )
