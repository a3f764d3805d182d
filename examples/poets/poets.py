"""The walkthrough's job adapter: run `lastlayer retrain` from a job's context.

The DC/OS TensorFlow service (and ``lastlayer job deploy``) import this module and call
``main(server, log_dir, context)``. ``context["args"]`` holds retrain flags; every
``{{shared_filesystem}}`` in a value becomes ``log_dir``, and a path under ``/mnt/mesos/sandbox``
(the task's persistent volume on DC/OS) is placed in the task's sandbox (``MESOS_SANDBOX``).
With several workers, each computes its shard of the bottlenecks and worker 0 trains; GPU workers
(``gpu_worker`` in the options file) take shards too, with the network on their GPU; with
``--engine spark`` in the context, :func:`executors` tells the job service so: it maps the workers'
count, cpus and mem onto Spark executors, worker 0 drives them, and the other workers have nothing
to do. It uses only lastlayer's public API.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any

import lastlayer

log = logging.getLogger(__name__)

MESOS_SANDBOX = "/mnt/mesos/sandbox"


def get_parser() -> argparse.ArgumentParser:
    """retrain's argument parser, from lastlayer's single declaration of its flags."""
    return lastlayer.RetrainOptions.parser("poets", "The walkthrough's retrain job.")


def get_args(context: dict[str, Any], log_dir: str) -> tuple[argparse.Namespace, list[str]]:
    """Flags from ``context["args"]``, with ``{{shared_filesystem}}`` replaced by ``log_dir``."""
    args: list[str] = []
    sandbox = os.environ.get("MESOS_SANDBOX")
    for key, value in context.get("args", {}).items():
        text = str(value).replace("{{shared_filesystem}}", log_dir)
        if sandbox and text.startswith(MESOS_SANDBOX):
            text = sandbox + text[len(MESOS_SANDBOX) :]
        args += [key, text]
    return get_parser().parse_known_args(lastlayer.RetrainOptions.normalize(args))


def executors(context: dict[str, Any]) -> str | None:
    """Asked by the job service before the tasks start: ``"spark"`` when the context's flags choose
    ``--engine spark`` (the workers then run as Spark executors driven by worker 0), else ``None``."""
    flags, _ = get_args(context, "")
    return "spark" if flags.engine == "spark" else None


def main(server: Any, log_dir: str, context: dict[str, Any]) -> None:
    """The job: retrain with the context's flags; workers share the bottleneck work."""
    flags, unparsed = get_args(context, log_dir)
    if unparsed:
        log.warning("Ignoring arguments retrain does not take: %s", " ".join(unparsed))
    opts = lastlayer.RetrainOptions.from_namespace(flags)
    opts.validate()
    engine = opts.engine
    role, index = getattr(server, "job_name", "worker"), getattr(server, "task_index", 0)
    pool = shard_pool(getattr(server, "cluster", {}))
    position = pool.index((role, index)) if (role, index) in pool else 0
    if engine.engine == "spark" and position > 0:
        log.info("Worker %d: Spark's executors do the workers' share; worker 0 drives them", position)
        return
    if engine.engine != "spark" and role == "gpuworker":
        engine = dataclasses.replace(engine, device="cuda")  # the GPUs the job service gave this task
    if engine.engine != "spark" and (role, index) in pool and len(pool) > 1:
        engine = dataclasses.replace(engine, worker_index=position, worker_count=len(pool))
    if engine.worker_index > 0:  # this task computes its shard of the bottlenecks; worker 0 trains
        lastlayer.extract_shard(**{**opts.shard_kwargs(), "engine": engine})
        return
    lastlayer.retrain(**{**opts.api_kwargs(), "engine": engine})


def shard_pool(cluster: dict[str, list[str]]) -> list[tuple[str, int]]:
    """The tasks sharing the bottleneck work, as ``(role, index)``: the workers, then the GPU workers
    (whose network runs on their GPU); the first one trains."""
    return [(role, i) for role in ("worker", "gpuworker") for i in range(len(cluster.get(role, [])))]
