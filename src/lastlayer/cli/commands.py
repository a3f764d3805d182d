"""``retrain``, ``label``, ``upload``, ``report`` and ``serve`` on the command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lastlayer.cli.cluster import storage_options
from lastlayer.cli.progress import ProgressBar, TrainingProgress
from lastlayer.errors import UsageError
from lastlayer.settings.options import (
    LabelOptions,
    ReportOptions,
    RetrainOptions,
    ServeOptions,
    UploadOptions,
    checked,
)

log = logging.getLogger("lastlayer")

if TYPE_CHECKING:
    from lastlayer.hadoop import HadoopLogin


def retrain(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    """``lastlayer retrain``: run the job; print the outcome as one JSON line."""
    from lastlayer import pipeline

    opts = checked(ns, RetrainOptions)
    terminal = sys.stderr.isatty()
    if opts.engine.worker_index > 0:  # a worker that only computes its shard of the bottlenecks
        shard = pipeline.extract_shard(**opts.shard_kwargs(), hadoop=hadoop, progress=ProgressBar(sys.stderr))
        print(shard.to_json())
        return 0
    result = pipeline.retrain(
        **opts.api_kwargs(),
        hadoop=hadoop,
        progress=ProgressBar(sys.stderr),
        on_evaluation=TrainingProgress(sys.stderr, opts.training.how_many_training_steps)
        if terminal
        else None,
    )
    metrics = result.metrics
    print(
        json.dumps(
            {
                "architecture": result.architecture,
                "output_graph": result.outputs.output_graph,
                "output_labels": result.outputs.output_labels,
                "summary_json": result.outputs.summary_json,
                "test_accuracy": metrics.test_accuracy,
                "test_n": metrics.test_n,
                "validation_and_test_accuracy": metrics.validation_and_test_accuracy,
                "report": result.outputs.report,
            }
        )
    )
    if terminal:
        _next_steps(result.outputs.report, result.outputs.output_graph)
    return 0


def _next_steps(report: str, graph: str) -> None:
    """On a terminal: where the report is, and the one line that serves the model."""
    if report:
        shown = Path(report).absolute().as_uri() if "://" not in report else report
        print(f"Open the report: {shown}", file=sys.stderr)
    print(f"Serve the model: lastlayer serve --graph={shlex.quote(graph)}", file=sys.stderr)


def label(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    from lastlayer.model import inference

    ns.image = [*(ns.image or []), *(ns.images or [])]  # the positional images are checked as --image is
    opts = checked(ns, LabelOptions)
    images = list(opts.image)
    if not images:
        raise UsageError("no image given: pass image paths or URLs, or --image=PATH")
    predictions = inference.label(
        opts.graph,
        images,
        labels=opts.labels,
        top_k=opts.top_k,
        threads=opts.num_threads,
        output_layer=opts.output_layer,
        storage_options=storage_options(hadoop),
    )
    for p in predictions:
        if opts.json:
            print(
                json.dumps(
                    {
                        "image": p.image,
                        "labels": [{"label": lb, "score": s} for lb, s in p.top],
                        "answer": p.answer,
                        "unknown": p.unknown is not None,
                        "ood_score": p.ood_score,
                        "error": p.error,
                    },
                    ensure_ascii=False,
                )
            )
        elif p.error is None:
            if len(images) > 1:
                print(f"{p.image}:")
            if p.unknown is not None:
                print(f"{p.unknown} (none of the classes: ood score = {p.ood_score:.5g}); scores:")
            if p.multi_label and not p.top:
                print("(no label at or above its threshold)")
            for label, score in p.top:
                print(f"{label} (score = {score:.5f})")
    return 1 if any(p.error for p in predictions) else 0


def upload(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    from lastlayer.transfer import upload

    opts = checked(ns, UploadOptions)
    report = upload(
        ns.src,
        ns.dst,
        threads=opts.threads,
        storage_options=storage_options(hadoop),
        progress=ProgressBar(sys.stderr, "Upload", "files"),
    )
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


def report(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    """``lastlayer report SUMMARY_JSON``: rebuild a run's HTML report from its summary file."""
    from lastlayer.report import input as report_input
    from lastlayer.report import page as report

    opts = checked(ns, ReportOptions)
    if (missing := report.missing_libraries()) is not None:
        raise UsageError(f"cannot build the report: {missing}")
    options = storage_options(hadoop)
    summary = report.read_summary(ns.summary_json, options)
    url = opts.output or report_input.default_url(ns.summary_json)
    report.write(summary, url, options, fetch_images=opts.fetch_images)
    print(json.dumps({"report": url}))
    return 0


def serve(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    """``lastlayer serve``: load the models, listen, and serve until interrupted."""
    from lastlayer import serve

    opts = checked(ns, ServeOptions)
    serve.require()
    models = serve.load_models(opts.graphs(), opts.num_threads, storage_options(hadoop))
    sock = serve.listen(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    for name, model in models.items():
        log.info("Model %s: %s (%d classes)", name, model.source, len(model.labels))
        log.info("  %s/v1/models/%s:classify  (POST image bytes)", base, name)
        log.info("  %s/v2/models/%s/infer  (KServe v2)", base, name)
    if opts.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "Listening on %s: anyone who reaches it can use the models (no authentication)", opts.host
        )
    log.info("Serving at %s/ (drop an image there); Ctrl-C stops", base)
    serve.server(models, opts).run(sockets=[sock])
    return 0
