"""``retrain``, ``label`` and ``upload`` on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from lastlayer.cli.cluster import storage_options
from lastlayer.cli.progress import ProgressBar
from lastlayer.errors import UsageError
from lastlayer.options import LabelOptions, RetrainOptions, UploadOptions, from_namespace

if TYPE_CHECKING:
    from lastlayer.hadoop import HadoopLogin


def retrain(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    """``lastlayer retrain``: run the job; print the outcome as one JSON line."""
    from lastlayer import pipeline
    from lastlayer.summary import ShardResult

    opts = from_namespace(ns, RetrainOptions)
    opts.validate()
    result = pipeline.retrain(**opts.api_kwargs(), hadoop=hadoop, progress=ProgressBar(sys.stderr))
    if isinstance(result, ShardResult):  # a worker that only computed its shard of the bottlenecks
        print(result.to_json())
        return 0
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
            }
        )
    )
    return 0


def label(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    from lastlayer import inference

    opts = from_namespace(ns, LabelOptions)
    opts.validate()
    images = list(opts.image) + list(ns.images or [])
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


def upload(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    from lastlayer.transfer import upload

    opts = from_namespace(ns, UploadOptions)
    opts.validate()
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
