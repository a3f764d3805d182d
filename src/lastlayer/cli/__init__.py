"""The ``lastlayer`` command, the only package that prints or decides exit codes.

``main(argv=None) -> int`` runs a sub-command in-process: 0 on success, 1 for a failed job,
2 for a usage mistake, 130 when interrupted. A :class:`LastlayerError` is printed as one line,
without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from lastlayer.cli import cluster, commands, job, progress
from lastlayer.cli.command import Command
from lastlayer.errors import LastlayerError, UsageError
from lastlayer.hadoop import ClusterConfig
from lastlayer.settings.options import (
    AuthToLocalOptions,
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
from lastlayer.version import __version__

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


COMMANDS: dict[str, Command] = {
    "retrain": Command(
        (RetrainOptions, ClusterConfig),
        "Retrain the last layer of a pretrained network on a folder of class folders.",
        commands.retrain,
        cluster=True,
    ),
    "label": Command(
        (LabelOptions, ClusterConfig),
        "Print the top labels of images with a retrained model.",
        commands.label,
        (("images", "*", "Images to label (paths or URLs)."),),
        cluster=True,
    ),
    "upload": Command(
        (UploadOptions, ClusterConfig),
        "Copy a local image folder to hdfs:// (or any fsspec URL) in parallel; a re-run resumes.",
        commands.upload,
        (
            ("src", "?", "Folder to copy."),
            ("dst", "?", "Destination URL, e.g. hdfs:///tensorflow_input_data."),
        ),
        cluster=True,
    ),
    "report": Command(
        (ReportOptions, ClusterConfig),
        "Rebuild the HTML report of a run from its summary file (<output_graph stem>.summary.json).",
        commands.report,
        (("summary_json", "?", "The run summary file (path or URL)."),),
        cluster=True,
    ),
    "serve": Command(
        (ServeOptions, ClusterConfig),
        "Serve retrained models over HTTP: KServe v2 (/v2/models/NAME/infer), "
        "POST /v1/models/NAME:classify with image bytes, and a page at / to drop images on.",
        commands.serve,
        cluster=True,
    ),
    "job": Command(
        (),
        "Deploy and watch jobs from an options file (the walkthrough's poets.json): " + job.JOB_USAGE,
        None,
        actions=job.actions(),
        usage=job.JOB_USAGE,
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
        _add_command(subs, name, command)
    return parser


def _add_command(subs: Any, name: str, command: Command) -> None:
    """Add ``command`` (and its actions, as nested sub-parsers) to the sub-parsers ``subs``."""
    sub = subs.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
    for cls in command.options:
        add_flags(sub, cls)
    for arg, nargs, help_text in command.positionals:
        sub.add_argument(arg, nargs=nargs, metavar=arg.upper(), help=help_text)
    if command.build is not None:
        command.build(sub)
    if command.actions:
        nested = sub.add_subparsers(metavar="ACTION")
        for action, child in command.actions.items():
            _add_command(nested, action, child)


def _resolve(args: Sequence[str]) -> tuple[list[str], Command]:
    """The command path at the front of ``args`` (``["job", "plan", "show"]``) and its Command."""
    path, command = [args[0]], COMMANDS[args[0]]
    while command.actions and len(path) < len(args) and not args[len(path)].startswith("-"):
        action = args[len(path)]
        if action not in command.actions:
            raise UsageError(f"unknown {' '.join(path)} action {action!r} (usage: {command.usage})")
        path.append(action)
        command = command.actions[action]
    return path, command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lastlayer`` command line; return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        path, command = _resolve(args) if args and args[0] in COMMANDS else ([], None)
        if command is not None:
            args = [*path, *normalize_bools(args[len(path) :], *command.options)]
        ns, unknown = parser.parse_known_args(args)
        if command is None:
            parser.print_help(sys.stderr)
            return 2
        reject_unknown(unknown, *command.options)
        if command.run is None:
            *others, last = command.actions
            choices = f"{', '.join(others)} or {last}" if others else last
            raise UsageError(f"{' '.join(path)} needs {choices} (usage: {command.usage})")
        missing = [arg for arg, nargs, _ in command.positionals if nargs == "?" and getattr(ns, arg) is None]
        if missing:
            raise UsageError(
                f"{' '.join(path)} needs {' and '.join(m.upper() for m in missing)} (see --help)"
            )
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
