"""``lastlayer job ACTION``: deploy and watch jobs from an options file, one sub-parser per action.

:func:`actions` is the table of actions (``plan`` has its own: ``show`` and ``restart``); each takes
only its own flags (a subset of :class:`lastlayer.settings.options.JobOptions`, declared there once) and its
own positionals, and maps onto one function of :mod:`lastlayer.jobs.api`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_type_hints

from lastlayer.cli.command import Command
from lastlayer.errors import UsageError
from lastlayer.settings.options import JobOptions

if TYPE_CHECKING:
    from lastlayer.jobs.plan import Plan

JOB_USAGE = (
    "job deploy OPTIONS.json | job plan show [deploy] | job plan restart [deploy] [STEP] | job tasks | "
    "job log TASK [stdout|stderr] | job stop | job uninstall | job package SRC_DIR ZIP | job secret NAME FILE"
)


def _flags(name: str, *names: str) -> type:
    """JobOptions reduced to the flags ``names``: what one action takes (help and defaults as declared)."""
    declared = {f.name: f for f in dataclasses.fields(JobOptions)}
    hints = get_type_hints(JobOptions)
    return dataclasses.make_dataclass(
        name,
        [
            (n, hints[n], dataclasses.field(default=declared[n].default, metadata=declared[n].metadata))
            for n in names
        ],
    )


_RUN = ("detach", "timeout", "secrets_dir")  # what runs the tasks: deploy, plan restart
DeployFlags = _flags("DeployFlags", "state_dir", *_RUN, "scheduler", "yarn_env")
# plan show, tasks, stop, uninstall (the secret store: a YARN job logs in again to ask YARN)
WatchFlags = _flags("WatchFlags", "name", "state_dir", "secrets_dir")
RestartFlags = _flags("RestartFlags", "name", "state_dir", *_RUN)
LogFlags = _flags("LogFlags", "name", "state_dir", "secrets_dir", "completed")
PackageFlags = _flags("PackageFlags", "root")
SecretFlags = _flags("SecretFlags", "secrets_dir")


def _options(ns: argparse.Namespace) -> JobOptions:
    """The action's flags, the others at their defaults; validated."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(JobOptions) if hasattr(ns, f.name)}
    opts = JobOptions(**given)
    opts.validate()
    return opts


def _need(action: str, what: str, *values: object) -> None:
    if any(value is None for value in values):
        raise UsageError(f"job {action} needs {what} (usage: {JOB_USAGE})")


def _shown() -> Callable[[Plan], None]:
    """Print the plan to stderr each time its rendering changes."""
    shown: list[str] = []

    def show(plan: Plan) -> None:
        text = plan.render()
        if not shown or shown[-1] != text:
            shown.append(text)
            print(text, file=sys.stderr, flush=True)

    return show


def _print_plan(plan: Plan, name: str, state_dir: str) -> None:
    """The plan as DC/OS draws it, then one line per failed step saying why, then the YARN application
    or TensorBoard's URL while it runs."""
    from lastlayer.jobs import api

    print(plan.render())
    for reason in plan.reasons():
        print(reason)
    app = api.yarn_application(name, state_dir or None)
    if app is not None:
        print(f"yarn: {app}")
    board = api.tensorboard_task(name, state_dir or None)
    if board is not None:
        print(f"tensorboard: {board.message}")


def deploy(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import api
    from lastlayer.jobs.plan import COMPLETE

    opts = _options(ns)
    _need("deploy", "the options file", ns.options)
    job, plan = api.deploy(
        ns.options,
        opts.state_dir or None,
        secrets_dir=opts.secrets_dir or None,
        detach=opts.detach,
        timeout=opts.timeout or None,
        on_change=_shown(),
        scheduler=opts.scheduler,
        yarn_env=opts.yarn_env,
    )
    if opts.detach:
        name = job.name
        print(f"deployed {name}: follow it with `lastlayer job plan show --name {name}`")
        return 0
    _print_plan(plan, job.name, opts.state_dir)
    return 0 if plan.status == COMPLETE else 1


def plan_show(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import api

    opts = _options(ns)
    shown = api.plan(opts.name, opts.state_dir or None, opts.secrets_dir or None)
    _print_plan(shown, opts.name, opts.state_dir)
    return 0


def plan_restart(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import api
    from lastlayer.jobs.plan import COMPLETE

    opts = _options(ns)
    steps = [a for a in (ns.plan, ns.step) if a is not None and a != "deploy"]
    if len(steps) > 1:
        raise UsageError(
            f"job plan restart restarts one step or all, got {', '.join(steps)} (usage: {JOB_USAGE})"
        )
    plan = api.restart(
        opts.name,
        opts.state_dir or None,
        steps[0] if steps else None,
        secrets_dir=opts.secrets_dir or None,
        detach=opts.detach,
        timeout=opts.timeout or None,
        on_change=_shown(),
    )
    _print_plan(plan, opts.name, opts.state_dir)
    return 0 if opts.detach or plan.status == COMPLETE else 1


def tasks(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import api

    opts = _options(ns)
    board = api.tensorboard_task(opts.name, opts.state_dir or None)
    listed = api.tasks(opts.name, opts.state_dir or None, opts.secrets_dir or None)
    for t in listed + ([board] if board else []):
        detail = f"  {t.message}" if t.message else ""
        code = "-" if t.exit_code is None else t.exit_code
        print(f"{t.name:<12} {t.status:<9} pid={t.pid or '-'} exit={code}{detail}")
    return 0


def log(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import api

    opts = _options(ns)
    _need("log", "a task name", ns.task)
    text = api.task_log(
        opts.name,
        ns.task,
        ns.stream,
        completed=opts.completed,
        state_dir=opts.state_dir or None,
        secrets_dir=opts.secrets_dir or None,
    )
    sys.stdout.write(text)
    return 0


def stop(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import api

    opts = _options(ns)
    print(api.stop(opts.name, opts.state_dir or None, opts.secrets_dir or None).render())
    return 0


def uninstall(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import api

    opts = _options(ns)
    api.uninstall(opts.name, opts.state_dir or None, opts.secrets_dir or None)
    print(f"uninstalled {opts.name}")
    return 0


def package(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs.package import build_zip

    opts = _options(ns)
    _need("package", "the job folder and the zip to write", ns.src_dir, ns.zip)
    build_zip(ns.src_dir, ns.zip, opts.root or None)
    print(ns.zip)
    return 0


def secret(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer.jobs import secret_store

    opts = _options(ns)
    _need("secret", "the secret name and the file holding its value", ns.secret, ns.file)
    data = secret_store.read_value_file(ns.file)
    secret_store.write_secret(
        ns.secret, data, opts.secrets_dir or None, base64_encode=secret_store.is_base64_name(ns.secret)
    )
    print(f"stored secret {ns.secret}")
    return 0


# --- the positionals and the options file's description (what the Command table cannot say) ------


def _deploy_arguments(parser: argparse.ArgumentParser) -> None:
    from lastlayer.jobs.spec import describe_options

    parser.add_argument(
        "options", nargs="?", metavar="OPTIONS", help="The options file (path or URL), e.g. poets.json."
    )
    lines = ["the options file (JSON), option by option:"]
    for path, kind, default, doc in describe_options():
        lines.append(f"  {path} ({kind}, {'required' if default is None else f'default {default!r}'}): {doc}")
    parser.epilog = "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _plan_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "plan", nargs="?", choices=["deploy"], metavar="PLAN", help="deploy: the only plan (may be left out)."
    )


def _plan_restart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", nargs="?", metavar="PLAN", help="deploy: the only plan (may be left out).")
    parser.add_argument(
        "step",
        nargs="?",
        metavar="STEP",
        help="The step to run again, e.g. worker-0 (default: every step not COMPLETE).",
    )


def _log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task", nargs="?", metavar="TASK", help="The task, e.g. worker-0 (see `lastlayer job tasks`)."
    )
    parser.add_argument(
        "stream", nargs="?", default="stdout", metavar="STREAM", help="stdout or stderr (default: stdout)."
    )


def _package_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src_dir", nargs="?", metavar="SRC_DIR", help="The folder holding the job's files.")
    parser.add_argument("zip", nargs="?", metavar="ZIP", help="The zip to write (path or URL).")


def _secret_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "secret", nargs="?", metavar="NAME", help="The secret's name, e.g. __dcos_base64__tensorflow_keytab."
    )
    parser.add_argument(
        "file", nargs="?", metavar="FILE", help="The file holding its value (e.g. the keytab)."
    )


def actions() -> dict[str, Command]:
    """The actions of ``lastlayer job``, for the COMMANDS table of :mod:`lastlayer.cli`."""

    def action(
        flags: type,
        help: str,
        run: Callable[[argparse.Namespace, Any], int],
        build: Callable[[argparse.ArgumentParser], None] | None = None,
    ) -> Command:
        return Command((flags,), help, run, build=build)

    plan = {
        "show": action(
            WatchFlags, "Print the job's deploy plan with its live statuses.", plan_show, _plan_show_arguments
        ),
        "restart": action(
            RestartFlags,
            "Run a failed step (or every step not COMPLETE) again; the bottleneck cache makes it resume.",
            plan_restart,
            _plan_restart_arguments,
        ),
    }
    return {
        "deploy": action(
            DeployFlags,
            "Deploy the job an options file describes (the walkthrough's poets.json) and run its tasks; "
            "prints the plan as it changes, or returns at once with --detach.",
            deploy,
            _deploy_arguments,
        ),
        "plan": Command(
            (), "Show a job's deploy plan, or restart its steps.", None, actions=plan, usage=JOB_USAGE
        ),
        "tasks": action(
            WatchFlags, "List the job's tasks: status, pid, exit code and why they failed.", tasks
        ),
        "log": action(
            LogFlags,
            "Print a task's stdout or stderr (a finished task's with --completed).",
            log,
            _log_arguments,
        ),
        "stop": action(WatchFlags, "Stop a running job: its supervisor and its tasks.", stop),
        "uninstall": action(
            WatchFlags, "Stop the job and remove its state folder (logs and local outputs).", uninstall
        ),
        "package": action(
            PackageFlags,
            "Zip a job folder reproducibly (the same folder always gives the same bytes).",
            package,
            _package_arguments,
        ),
        "secret": action(
            SecretFlags,
            "Store a secret (e.g. a keytab) in the local secret store, owner-only; a __dcos_base64__ name "
            "is stored base64-encoded.",
            secret,
            _secret_arguments,
        ),
    }
