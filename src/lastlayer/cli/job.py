"""``lastlayer job ...``: deploy and watch jobs from an options file."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lastlayer.errors import UsageError
from lastlayer.options import JobOptions, from_namespace

JOB_USAGE = (
    "job deploy OPTIONS.json | job plan show [deploy] | job plan restart [deploy] [STEP] | job tasks | "
    "job log TASK [stdout|stderr] | job stop | job uninstall | job package SRC_DIR ZIP | job secret NAME FILE"
)


def job(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer import archive, secrets
    from lastlayer.jobs import service
    from lastlayer.jobs.plan import COMPLETE

    opts = from_namespace(ns, JobOptions)
    opts.validate()
    action, args = ns.action, list(ns.args or [])

    def need(count: int, what: str) -> None:
        if len(args) < count:
            raise UsageError(f"job {action} needs {what} (usage: {JOB_USAGE})")

    state = opts.state_dir or None
    timeout = opts.timeout or None
    shown: list[str] = []

    def show(plan: object) -> None:
        text = plan.render()  # type: ignore[attr-defined]
        if not shown or shown[-1] != text:
            shown.append(text)
            print(text, file=sys.stderr, flush=True)

    if opts.secrets_dir:
        os.environ["LASTLAYER_SECRETS_DIR"] = opts.secrets_dir
    if action == "deploy":
        need(1, "the options file")
        job, plan = service.deploy(args[0], state, detach=opts.detach, timeout=timeout, on_change=show)
        if opts.detach:
            name = job.folder.name
            print(f"deployed {name}: follow it with `lastlayer job plan show --name {name}`")
            return 0
        print(plan.render())
        return 0 if plan.status == COMPLETE else 1
    if action == "plan":
        need(1, "show or restart")
        plan_args = [a for a in args[1:] if a != "deploy"]
        if args[0] == "show":
            print(service.Job.named(opts.name, state).plan().render())
            return 0
        if args[0] == "restart":
            step = plan_args[0] if plan_args else None
            plan = service.restart(
                opts.name, state, step, detach=opts.detach, timeout=timeout, on_change=show
            )
            print(plan.render())
            return 0 if opts.detach or plan.status == COMPLETE else 1
        raise UsageError(f"job plan {args[0]!r}: use `job plan show` or `job plan restart [STEP]`")
    if action == "tasks":
        for t in service.tasks(opts.name, state):
            detail = f"  {t.message}" if t.message else ""
            code = "-" if t.exit_code is None else t.exit_code
            print(f"{t.name:<12} {t.status:<9} pid={t.pid or '-'} exit={code}{detail}")
        return 0
    if action == "log":
        need(1, "a task name")
        stream = args[1] if len(args) > 1 else "stdout"
        sys.stdout.write(
            service.task_log(opts.name, args[0], stream, completed=opts.completed, state_dir=state)
        )
        return 0
    if action == "stop":
        print(service.stop(opts.name, state).render())
        return 0
    if action == "uninstall":
        service.uninstall(opts.name, state)
        print(f"uninstalled {opts.name}")
        return 0
    if action == "package":
        need(2, "the job folder and the zip to write")
        archive.build_zip(args[0], args[1], opts.root or None)
        print(args[1])
        return 0
    if action == "secret":
        need(2, "the secret name and the file holding its value")
        with open(args[1], "rb") as f:
            data = f.read()
        secrets.write_secret(
            args[0], data, opts.secrets_dir or None, base64_encode=secrets.is_base64_name(args[0])
        )
        print(f"stored secret {args[0]}")
        return 0
    raise UsageError(f"unknown job action {action!r} (usage: {JOB_USAGE})")
