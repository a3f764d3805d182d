"""The ``lastlayer`` command. The only module that prints or decides exit codes.

``main(argv=None) -> int`` runs a sub-command in-process: 0 on success, 1 for a failed job,
2 for a usage mistake, 130 when interrupted. A :class:`LastlayerError` is printed as one line,
without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lastlayer import __version__
from lastlayer.cli import cluster, commands, job, progress
from lastlayer.errors import LastlayerError, UsageError
from lastlayer.options import (
    AuthToLocalOptions,
    ClusterOptions,
    JobOptions,
    LabelOptions,
    ReportOptions,
    RetrainOptions,
    ServeOptions,
    UploadOptions,
    add_flags,
    new_parser,
    normalize_bools,
    reject_unknown,
)

log = logging.getLogger("lastlayer")

LOG_FORMAT = "%(levelname)s:%(name)s:%(message)s"


def _configure_logging(level: str) -> None:
    name = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level.upper(), level.upper())
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_lastlayer", False):
            root.removeHandler(handler)
    handler = progress.log_handler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler._lastlayer = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, name, logging.INFO))


@dataclass(frozen=True)
class Command:
    """One sub-command: its option classes, positional arguments, help and runner."""

    options: tuple[type, ...]
    help: str
    run: Callable[[argparse.Namespace, Any], int]  # (flags, the cluster login or None)
    positionals: tuple[tuple[str, str, str], ...] = ()  # (name, nargs, help)
    cluster: bool = False


COMMANDS: dict[str, Command] = {
    "retrain": Command(
        (RetrainOptions, ClusterOptions),
        "Retrain the last layer of a pretrained network on a folder of class folders.",
        commands.retrain,
        cluster=True,
    ),
    "label": Command(
        (LabelOptions, ClusterOptions),
        "Print the top labels of images with a retrained model.",
        commands.label,
        (("images", "*", "Images to label (paths or URLs)."),),
        cluster=True,
    ),
    "upload": Command(
        (UploadOptions, ClusterOptions),
        "Copy a local image folder to hdfs:// (or any fsspec URL) in parallel; a re-run resumes.",
        commands.upload,
        (
            ("src", "?", "Folder to copy."),
            ("dst", "?", "Destination URL, e.g. hdfs:///tensorflow_input_data."),
        ),
        cluster=True,
    ),
    "report": Command(
        (ReportOptions, ClusterOptions),
        "Rebuild the HTML report of a run from its summary file (<output_graph stem>.summary.json).",
        commands.report,
        (("summary_json", "?", "The run summary file (path or URL)."),),
        cluster=True,
    ),
    "serve": Command(
        (ServeOptions, ClusterOptions),
        "Serve retrained models over HTTP: KServe v2 (/v2/models/NAME/infer), "
        "POST /v1/models/NAME:classify with image bytes, and a page at / to drop images on.",
        commands.serve,
        cluster=True,
    ),
    "job": Command(
        (JobOptions,),
        "Deploy and watch jobs from an options file (the walkthrough's poets.json): " + job.JOB_USAGE,
        job.job,
        (
            ("action", "?", "deploy, plan, tasks, log, stop, uninstall, package or secret."),
            ("args", "*", "The action's arguments."),
        ),
    ),
    "auth-to-local": Command(
        (AuthToLocalOptions,),
        "Print the short (local) name Hadoop's auth_to_local rules give a Kerberos principal.",
        cluster.auth_to_local,
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
        if not command.cluster:
            return command.run(ns, None)
        with cluster.connect(ns) as hadoop:
            return command.run(ns, hadoop)
    except LastlayerError as exc:
        print(f"lastlayer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lastlayer: interrupted", file=sys.stderr)
        return 130
