"""``retrain``: the whole job, from an image folder to a model, labels, summaries and a run summary.

:func:`retrain` returns the run summary (a JSON-ready dict) and logs retrain.py's lines through
``logging``; it prints nothing. Every output is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer import __version__, storage
from lastlayer.dataset import TESTING, TRAINING, VALIDATION, ImageSet, scan
from lastlayer.demo import demo_image_dir
from lastlayer.errors import DataError
from lastlayer.export import build_classifier
from lastlayer.features import Bottlenecks, compute_bottlenecks
from lastlayer.options import RetrainOptions
from lastlayer.summaries import SummaryWriter
from lastlayer.train import Classifier, Evaluation, TrainConfig, confusion_matrix, per_class_scores, train
from lastlayer.zoo import FeatureModel, load_feature_model

if TYPE_CHECKING:
    from lastlayer.hadoop import HadoopLogin

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
#: Seconds between looks at the cache while worker 0 waits for the other workers' shards.
SHARD_POLL_SECONDS = 2.0


def _summary_url(opts: RetrainOptions) -> str:
    return opts.summary_json or posixpath.splitext(opts.output_graph)[0] + ".summary.json"


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def _accuracy(clf: Classifier, x: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.mean(clf.predict(x) == y)) if len(y) else None


class _Splits:
    """Positions of the usable images of each split, their labels and plain features."""

    def __init__(self, images: ImageSet, bottlenecks: Bottlenecks) -> None:
        labels = np.array([f.label_index for f in images.files], np.int64)
        usable = bottlenecks.rows >= 0
        self.index = {
            split: np.array([i for i in images.indices(split) if usable[i]], np.int64)
            for split in (TRAINING, VALIDATION, TESTING)
        }
        self.labels = {split: labels[idx] for split, idx in self.index.items()}
        self._b = bottlenecks

    def x(self, split: str) -> np.ndarray:
        """``float32 [N_split, D]`` plain features."""
        return self._b.plain[self._b.rows[self.index[split]]]


def _check_classes(images: ImageSet, splits: _Splits) -> None:
    present = set(splits.labels[TRAINING].tolist())
    missing = [label for i, label in enumerate(images.labels) if i not in present]
    if missing:
        raise DataError(
            f"class(es) {', '.join(repr(m) for m in missing)} have no usable training images: add images "
            "or lower --testing_percentage / --validation_percentage"
        )


def retrain(
    opts: RetrainOptions,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    hadoop: HadoopLogin | None = None,
) -> dict[str, Any]:
    """Run the whole retraining job described by ``opts``; return the run summary.

    ``hadoop`` is the cluster login a Spark session started here uses (see
    :func:`lastlayer.engines.spark.settings`); storage goes through ``storage_options``.

    With ``--engine=spark`` the Spark session starts first: pyspark launches its JVM from a forked
    child, which must not inherit the threads (and their locks) that storage clients start later.

    Raises:
        LastlayerError: for anything the user can fix (bad data, flags, storage, model).
    """
    opts.validate()
    if opts.engine != "spark":
        return _run(opts, storage_options, progress)
    from lastlayer.engines import spark

    with spark.session(opts.spark_master, hadoop):
        return _run(opts, storage_options, progress)


def _run(
    opts: RetrainOptions, storage_options: Mapping[str, Any] | None, progress: Progress | None
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 3)
        tick = now

    image_dir = opts.image_dir
    if not image_dir:
        image_dir = demo_image_dir()
        log.info("No --image_dir given: using the bundled demo set (Fashion-MNIST sample) at %s", image_dir)
    seed = opts.random_seed if opts.random_seed is not None else secrets.randbits(32)
    log.info("Random seed: %d", seed)

    model: FeatureModel = load_feature_model(opts.architecture, opts.model_dir, storage_options)
    if model.warning:
        log.warning("%s", model.warning)
    log.info(
        "Architecture: %s (%d features, %d px input)",
        model.architecture,
        model.feature_size,
        model.preprocessing.size,
    )
    lap("model_s")

    images = scan(image_dir, opts.testing_percentage, opts.validation_percentage, storage_options)
    log.info(
        "Found %d images in %d classes: %s", len(images.files), len(images.labels), ", ".join(images.labels)
    )
    lap("scan_s")

    shard = (opts.worker_index, opts.worker_count)

    def bottlenecks_now(report: Progress | None) -> Bottlenecks:
        return compute_bottlenecks(
            images,
            model,
            opts.bottleneck_dir,
            distortions=opts.distortions,
            variants=opts.distorted_variants,
            batch_size=opts.batch_size,
            threads=opts.num_threads,
            storage_options=storage_options,
            progress=report,
            shard=shard,
            engine=opts.engine,
            spark_master=opts.spark_master,
        )

    bottlenecks = bottlenecks_now(progress)
    computed = bottlenecks.computed
    log.info(
        "Bottlenecks: %d computed, %d from the cache, %d skipped",
        bottlenecks.computed,
        bottlenecks.reused,
        len(bottlenecks.skipped),
    )
    if opts.worker_index > 0:
        log.info(
            "Worker %d of %d: its shard of the bottlenecks is cached; worker 0 trains",
            opts.worker_index,
            opts.worker_count,
        )
        return {
            "worker_index": opts.worker_index,
            "worker_count": opts.worker_count,
            "architecture": model.architecture,
            "cache": {"computed": computed, "reused": bottlenecks.reused},
        }
    deadline = time.monotonic() + opts.shard_wait_seconds
    while bottlenecks.pending:
        if time.monotonic() > deadline:
            raise DataError(
                f"{bottlenecks.pending} images of other workers' shards are still not in "
                f"{opts.bottleneck_dir} after {opts.shard_wait_seconds:.0f} s: "
                "check the other workers' logs, then run again"
            )
        log.info(
            "Waiting for the other workers: %d images of their shards not cached yet", bottlenecks.pending
        )
        time.sleep(SHARD_POLL_SECONDS)
        bottlenecks = bottlenecks_now(None)
    lap("bottlenecks_s")

    splits = _Splits(images, bottlenecks)
    _check_classes(images, splits)
    train_rows = bottlenecks.rows[splits.index[TRAINING]]
    if bottlenecks.variant_rows is not None and bottlenecks.distorted is not None:
        variant_rows = bottlenecks.variant_rows[splits.index[TRAINING]]
        distorted = bottlenecks.distorted

        def train_x(pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return distorted[variant_rows[pos, rng.integers(0, variant_rows.shape[1], len(pos))]]
    else:
        plain = bottlenecks.plain

        def train_x(pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return plain[train_rows[pos]]

    n_classes = len(images.labels)
    train_writer = SummaryWriter(storage.join(opts.summaries_dir, "train"), storage_options)
    validation_writer = SummaryWriter(storage.join(opts.summaries_dir, "validation"), storage_options)
    last: list[Evaluation] = []

    def on_eval(ev: Evaluation) -> None:
        last[:] = [ev]
        train_writer.scalar("accuracy", ev.train_accuracy, ev.step)
        train_writer.scalar("cross_entropy", ev.cross_entropy, ev.step)
        if ev.validation_accuracy is not None and ev.validation_cross_entropy is not None:
            validation_writer.scalar("accuracy", ev.validation_accuracy, ev.step)
            validation_writer.scalar("cross_entropy", ev.validation_cross_entropy, ev.step)

    def on_checkpoint(step: int, clf: Classifier) -> None:
        freq = opts.intermediate_store_frequency
        if freq > 0 and step > 0 and step % freq == 0:
            url = storage.join(opts.intermediate_output_graphs_dir, f"intermediate_{step}.onnx")
            log.info("Save intermediate result to : %s", url)
            storage.write_atomic(
                url, build_classifier(model, clf, images.labels, opts.final_tensor_name), storage_options
            )

    if not len(splits.labels[VALIDATION]):
        log.warning("The validation set is empty: no validation accuracy (raise --validation_percentage)")
    config = TrainConfig(
        opts.how_many_training_steps,
        opts.learning_rate,
        opts.train_batch_size,
        opts.eval_step_interval,
        opts.validation_batch_size,
        seed,
    )
    val_x = splits.x(VALIDATION)
    with train_writer, validation_writer:
        clf = train(
            train_x,
            splits.labels[TRAINING],
            val_x,
            splits.labels[VALIDATION],
            model.feature_size,
            n_classes,
            config,
            on_eval,
            on_checkpoint,
        )
    lap("training_s")

    full_test_x, full_test_y = splits.x(TESTING), splits.labels[TESTING]
    test_x, test_y = full_test_x, full_test_y
    test_files = [images.files[i] for i in splits.index[TESTING]]
    if opts.test_batch_size != -1 and len(test_y):
        pick = np.random.default_rng(seed + 1).integers(0, len(test_y), opts.test_batch_size)
        test_x, test_y, test_files = test_x[pick], test_y[pick], [test_files[i] for i in pick]
    test_pred = clf.predict(test_x) if len(test_y) else np.zeros(0, np.int64)
    test_accuracy = float(np.mean(test_pred == test_y)) if len(test_y) else None
    if test_accuracy is None:
        log.warning("The test set is empty: no final test accuracy (raise --testing_percentage)")
    else:
        log.info("Final test accuracy = %.1f%% (N=%d)", test_accuracy * 100, len(test_y))
    if opts.print_misclassified_test_images:
        log.info("=== MISCLASSIFIED TEST IMAGES ===")
        for f, pred, truth in zip(test_files, test_pred, test_y, strict=True):
            if pred != truth:
                log.info("%70s  %s", f.url, images.labels[pred])

    confusion = confusion_matrix(full_test_y, clf.predict(full_test_x), n_classes)
    precision, recall = per_class_scores(confusion)
    held_out_x = np.concatenate([val_x, full_test_x])
    held_out_y = np.concatenate([splits.labels[VALIDATION], full_test_y])

    extra = {"model_key": model.key, "seed": str(seed)}
    storage.write_atomic(
        opts.output_graph,
        build_classifier(model, clf, images.labels, opts.final_tensor_name, extra),
        storage_options,
    )
    log.info("Save final result to : %s", opts.output_graph)
    storage.write_atomic(opts.output_labels, ("\n".join(images.labels) + "\n").encode(), storage_options)
    lap("export_s")
    timings["total_s"] = round(time.perf_counter() - started, 3)

    final = last[0] if last else None
    summary: dict[str, Any] = {
        "lastlayer_version": __version__,
        "architecture": model.architecture,
        "architecture_requested": opts.architecture,
        "model_key": model.key,
        "seed": seed,
        "image_dir": image_dir,
        "labels": list(images.labels),
        "image_counts": images.counts(),
        "images": {
            "found": len(images.files),
            "used": int((bottlenecks.rows >= 0).sum()),
            "skipped": len(bottlenecks.skipped),
            **{split: len(splits.index[split]) for split in (TRAINING, VALIDATION, TESTING)},
        },
        "skipped": [{"path": path, "reason": reason} for path, reason in bottlenecks.skipped],
        "metrics": {
            "steps": opts.how_many_training_steps,
            "final_train_accuracy": final.train_accuracy if final else None,
            "final_cross_entropy": final.cross_entropy if final else None,
            "final_validation_accuracy": final.validation_accuracy if final else None,
            "test_accuracy": test_accuracy,
            "test_n": len(test_y),
            "train_accuracy_all": _accuracy(clf, splits.x(TRAINING), splits.labels[TRAINING]),
            "validation_accuracy_all": _accuracy(clf, val_x, splits.labels[VALIDATION]),
            "test_accuracy_all": _accuracy(clf, full_test_x, full_test_y),
            "validation_and_test_accuracy": _accuracy(clf, held_out_x, held_out_y),
            "validation_and_test_n": len(held_out_y),
        },
        "confusion_matrix": {
            "split": TESTING,
            "rows": "true label",
            "columns": "predicted label",
            "matrix": confusion.tolist(),
        },
        "per_class": {
            label: {
                "precision": _finite(precision[i]),
                "recall": _finite(recall[i]),
                "support": int(confusion[i].sum()),
            }
            for i, label in enumerate(images.labels)
        },
        "cache": {
            "computed": computed,
            "reused": bottlenecks.reused,
            "damaged_files": bottlenecks.damaged_files,
        },
        "timings": timings,
        "outputs": {
            "output_graph": opts.output_graph,
            "output_labels": opts.output_labels,
            "summaries_dir": opts.summaries_dir,
            "summary_json": _summary_url(opts),
        },
        "options": asdict(opts),
    }
    storage.write_atomic(
        _summary_url(opts), json.dumps(summary, indent=2, ensure_ascii=False).encode(), storage_options
    )
    return summary
