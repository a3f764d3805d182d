"""The ``lastlayer`` command. The only module that prints or decides exit codes.

``main(argv=None) -> int`` runs a sub-command in-process: 0 on success, 1 for a failed job,
2 for a usage mistake, 130 when interrupted. A :class:`LastlayerError` is printed as one line,
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from lastlayer import __version__
from lastlayer.errors import LastlayerError, UsageError
from lastlayer.options import (
    AuthToLocalOptions,
    ClusterOptions,
    JobOptions,
    LabelOptions,
    RetrainOptions,
    UploadOptions,
    add_flags,
    from_namespace,
    new_parser,
    normalize_bools,
    reject_unknown,
)

log = logging.getLogger("lastlayer")

LOG_FORMAT = "%(levelname)s:%(name)s:%(message)s"


class ProgressBar:
    """Items done, items/s and ETA: a redrawn bar on a terminal, a log line every ``every`` s otherwise."""

    def __init__(
        self, stream: TextIO, what: str = "Bottlenecks", unit: str = "images", every: float = 10.0
    ) -> None:
        self.stream = stream
        self.what = what
        self.unit = unit
        self.tty = stream.isatty()
        self.every = every
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        text = (
            f"{done}/{total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}  ")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self.last >= self.every or done >= total:
            self.last = now
            log.info("%s: %s", self.what, text)


def _configure_logging(level: str) -> None:
    name = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level.upper(), level.upper())
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_lastlayer", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler._lastlayer = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, name, logging.INFO))


def _retrain(ns: argparse.Namespace) -> int:
    from lastlayer.retrain import retrain

    opts = from_namespace(ns, RetrainOptions)
    summary = retrain(opts, progress=ProgressBar(sys.stderr))
    if "metrics" not in summary:  # a worker that only computed its shard of the bottlenecks
        print(json.dumps(summary))
        return 0
    metrics = summary["metrics"]
    print(
        json.dumps(
            {
                "architecture": summary["architecture"],
                "output_graph": opts.output_graph,
                "output_labels": opts.output_labels,
                "summary_json": summary["outputs"]["summary_json"],
                "test_accuracy": metrics["test_accuracy"],
                "test_n": metrics["test_n"],
                "validation_and_test_accuracy": metrics["validation_and_test_accuracy"],
            }
        )
    )
    return 0


def _label(ns: argparse.Namespace) -> int:
    from lastlayer.label import label_images

    opts = from_namespace(ns, LabelOptions)
    opts.validate()
    images = list(opts.image) + list(ns.images or [])
    if not images:
        raise UsageError("no image given: pass image paths or URLs, or --image=PATH")
    predictions = label_images(
        opts.graph,
        images,
        labels=opts.labels,
        top_k=opts.top_k,
        threads=opts.num_threads,
        output_layer=opts.output_layer,
    )
    for p in predictions:
        if opts.json:
            print(
                json.dumps(
                    {
                        "image": p.image,
                        "labels": [{"label": lb, "score": s} for lb, s in p.top],
                        "error": p.error,
                    },
                    ensure_ascii=False,
                )
            )
        elif p.error is None:
            if len(images) > 1:
                print(f"{p.image}:")
            for label, score in p.top:
                print(f"{label} (score = {score:.5f})")
    return 1 if any(p.error for p in predictions) else 0


def _connect(ns: argparse.Namespace) -> None:
    """Hadoop configuration and Kerberos login, before anything touches ``hdfs://``."""
    from lastlayer import hadoop, kerberos

    opts = from_namespace(ns, ClusterOptions)
    opts.validate()
    hadoop.configure(opts.hadoop_conf_dir, opts.hdfs_config_uri)
    if opts.principal:
        kerberos.login(opts.principal, opts.keytab, opts.krb5_conf or None)
    elif opts.krb5_conf:
        os.environ["KRB5_CONFIG"] = opts.krb5_conf


def _upload(ns: argparse.Namespace) -> int:
    from lastlayer.upload import upload

    opts = from_namespace(ns, UploadOptions)
    opts.validate()
    report = upload(ns.src, ns.dst, threads=opts.threads, progress=ProgressBar(sys.stderr, "Upload", "files"))
    print(
        json.dumps(
            {
                "files": report.files,
                "copied": report.copied,
                "skipped": report.skipped,
                "bytes_copied": report.bytes_copied,
                "seconds": round(report.seconds, 3),
            }
        )
    )
    return 0


def _auth_to_local(ns: argparse.Namespace) -> int:
    from lastlayer import auth_to_local, kerberos, storage

    opts = from_namespace(ns, AuthToLocalOptions)
    opts.validate()
    if opts.rules_base64:
        rules = auth_to_local.rules_from_base64(opts.rules_base64)
    elif opts.core_site:
        rules = auth_to_local.rules_from_core_site(storage.read_bytes(opts.core_site))
    else:
        rules = opts.rules
    realm = opts.default_realm or kerberos.default_realm() or ns.principal.rpartition("@")[2]
    print(auth_to_local.short_name(ns.principal, rules, realm, opts.mechanism))
    return 0


JOB_USAGE = (
    "job deploy OPTIONS.json | job plan show [deploy] | job plan restart [deploy] [STEP] | job tasks | "
    "job log TASK [stdout|stderr] | job stop | job uninstall | job package SRC_DIR ZIP | job secret NAME FILE"
)


def _job(ns: argparse.Namespace) -> int:
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


@dataclass(frozen=True)
class Command:
    """One sub-command: its option classes, positional arguments, help and runner."""

    options: tuple[type, ...]
    help: str
    run: Callable[[argparse.Namespace], int]
    positionals: tuple[tuple[str, str, str], ...] = ()  # (name, nargs, help)
    cluster: bool = False


COMMANDS: dict[str, Command] = {
    "retrain": Command(
        (RetrainOptions, ClusterOptions),
        "Retrain the last layer of a pretrained network on a folder of class folders.",
        _retrain,
        cluster=True,
    ),
    "label": Command(
        (LabelOptions, ClusterOptions),
        "Print the top labels of images with a retrained model.",
        _label,
        (("images", "*", "Images to label (paths or URLs)."),),
        cluster=True,
    ),
    "upload": Command(
        (UploadOptions, ClusterOptions),
        "Copy a local image folder to hdfs:// (or any fsspec URL) in parallel; a re-run resumes.",
        _upload,
        (
            ("src", "?", "Folder to copy."),
            ("dst", "?", "Destination URL, e.g. hdfs:///tensorflow_input_data."),
        ),
        cluster=True,
    ),
    "job": Command(
        (JobOptions,),
        "Deploy and watch jobs from an options file (the walkthrough's poets.json): " + JOB_USAGE,
        _job,
        (
            ("action", "?", "deploy, plan, tasks, log, stop, uninstall, package or secret."),
            ("args", "*", "The action's arguments."),
        ),
    ),
    "auth-to-local": Command(
        (AuthToLocalOptions,),
        "Print the short (local) name Hadoop's auth_to_local rules give a Kerberos principal.",
        _auth_to_local,
        (("principal", "?", "e.g. tensorflow@LOCAL or hdfs/localhost@LOCAL."),),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The full ``lastlayer`` parser with its sub-commands."""
    parser = new_parser(
        "lastlayer",
        "Retrain the last layer of a pretrained image network on your own photos, "
        "on local files or any fsspec URL (hdfs://, ...).",
    )
    parser.add_argument("--version", action="version", version=f"lastlayer {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subs.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        for cls in command.options:
            add_flags(sub, cls)
        for arg, nargs, help_text in command.positionals:
            sub.add_argument(arg, nargs=nargs, metavar=arg.upper(), help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lastlayer`` command line; return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        args = [args[0], *normalize_bools(args[1:], *COMMANDS[args[0]].options)]
    parser = build_parser()
    try:
        ns, unknown = parser.parse_known_args(args)
        if ns.command is None:
            parser.print_help(sys.stderr)
            return 2
        command = COMMANDS[ns.command]
        reject_unknown(unknown, *command.options)
        missing = [arg for arg, nargs, _ in command.positionals if nargs == "?" and getattr(ns, arg) is None]
        if missing:
            raise UsageError(f"{ns.command} needs {' and '.join(m.upper() for m in missing)} (see --help)")
        _configure_logging(getattr(ns, "logging_verbosity", "INFO"))
        if command.cluster:
            _connect(ns)
        return command.run(ns)
    except LastlayerError as exc:
        print(f"lastlayer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lastlayer: interrupted", file=sys.stderr)
        return 130
