"""The walkthrough's job adapter: run `lastlayer retrain` from a job's context.

The DC/OS TensorFlow service (and ``lastlayer job deploy``) import this module and call
``main(server, log_dir, context)``. ``context["args"]`` holds retrain flags; every
``{{shared_filesystem}}`` in a value becomes ``log_dir``, and a path under ``/mnt/mesos/sandbox``
(the task's persistent volume on DC/OS) is placed in the task's sandbox (``MESOS_SANDBOX``).
With several workers, each computes its shard of the bottlenecks and worker 0 trains; with
``--engine spark`` in the context, :func:`executors` tells the job service so: it maps the workers'
count, cpus and mem onto Spark executors, worker 0 drives them, and the other workers have nothing
to do.
"""

from __future__ import annotations

import argparse
import logging
import os

from lastlayer.options import RetrainOptions, add_flags, from_namespace, new_parser, normalize_bools
from lastlayer.retrain import retrain

log = logging.getLogger(__name__)

MESOS_SANDBOX = "/mnt/mesos/sandbox"


def get_parser() -> argparse.ArgumentParser:
    """retrain's argument parser, from lastlayer's single declaration of its flags."""
    parser = new_parser("poets", "The walkthrough's retrain job.")
    add_flags(parser, RetrainOptions)
    return parser


def get_args(context: dict, log_dir: str) -> tuple[argparse.Namespace, list[str]]:
    """Flags from ``context["args"]``, with ``{{shared_filesystem}}`` replaced by ``log_dir``."""
    args: list[str] = []
    sandbox = os.environ.get("MESOS_SANDBOX")
    for key, value in context.get("args", {}).items():
        text = str(value).replace("{{shared_filesystem}}", log_dir)
        if sandbox and text.startswith(MESOS_SANDBOX):
            text = sandbox + text[len(MESOS_SANDBOX) :]
        args += [key, text]
    return get_parser().parse_known_args(normalize_bools(args, RetrainOptions))


def executors(context: dict) -> str | None:
    """Asked by the job service before the tasks start: ``"spark"`` when the context's flags choose
    ``--engine spark`` (the workers then run as Spark executors driven by worker 0), else ``None``."""
    flags, _ = get_args(context, "")
    return "spark" if flags.engine == "spark" else None


def main(server: object, log_dir: str, context: dict) -> None:
    """The job: retrain with the context's flags; workers share the bottleneck work."""
    flags, unparsed = get_args(context, log_dir)
    if unparsed:
        log.warning("Ignoring arguments retrain does not take: %s", " ".join(unparsed))
    opts = from_namespace(flags, RetrainOptions)
    workers = getattr(server, "cluster", {}).get("worker", [])
    if opts.engine == "spark" and getattr(server, "task_index", 0) > 0:
        log.info(
            "Worker %d: Spark's executors do the workers' share; worker 0 drives them", server.task_index
        )  # type: ignore[attr-defined]
        return
    if opts.engine != "spark" and getattr(server, "job_name", "worker") == "worker" and len(workers) > 1:
        opts.worker_index, opts.worker_count = server.task_index, len(workers)  # type: ignore[attr-defined]
    retrain(opts)
