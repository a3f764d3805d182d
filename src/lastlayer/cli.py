"""The ``lastlayer`` command. The only module that prints or decides exit codes.

``main(argv=None) -> int`` runs a sub-command in-process: 0 on success, 1 for a failed job,
2 for a usage mistake, 130 when interrupted. A :class:`LastlayerError` is printed as one line,
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from lastlayer import __version__
from lastlayer.errors import LastlayerError, UsageError
from lastlayer.options import (
    LabelOptions,
    RetrainOptions,
    add_flags,
    from_namespace,
    new_parser,
    normalize_bools,
    reject_unknown,
)

log = logging.getLogger("lastlayer")

LOG_FORMAT = "%(levelname)s:%(name)s:%(message)s"


class ProgressBar:
    """Images done, images/s and ETA: a redrawn bar on a terminal, a log line every ``every`` s otherwise."""

    def __init__(self, stream: TextIO, every: float = 10.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        text = f"{done}/{total} images, {rate:.1f} images/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}  ")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self.last >= self.every or done >= total:
            self.last = now
            log.info("Bottlenecks: %s", text)


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
    _configure_logging(opts.logging_verbosity)
    summary = retrain(opts, progress=ProgressBar(sys.stderr))
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
    _configure_logging("INFO")
    opts.validate()
    images = list(opts.image) + list(ns.images)
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


COMMANDS: dict[str, tuple[type, str, Callable[[argparse.Namespace], int]]] = {
    "retrain": (
        RetrainOptions,
        "Retrain the last layer of a pretrained network on a folder of class folders.",
        _retrain,
    ),
    "label": (LabelOptions, "Print the top labels of images with a retrained model.", _label),
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
    for name, (cls, help_text, _) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        add_flags(sub, cls)
        if cls is LabelOptions:
            sub.add_argument("images", nargs="*", metavar="IMAGE", help="Images to label (paths or URLs).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lastlayer`` command line; return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        args = [args[0], *normalize_bools(args[1:], COMMANDS[args[0]][0])]
    parser = build_parser()
    try:
        ns, unknown = parser.parse_known_args(args)
        if ns.command is None:
            parser.print_help(sys.stderr)
            return 2
        cls, _, run = COMMANDS[ns.command]
        reject_unknown(unknown, cls)
        return run(ns)
    except LastlayerError as exc:
        print(f"lastlayer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lastlayer: interrupted", file=sys.stderr)
        return 130
