"""``retrain``: from an image folder to a model, labels, summaries and a run summary, as named stages.

:func:`retrain` runs :func:`load_model` → :func:`scan_images` → :func:`extract` (→
:func:`wait_for_shards`) → :func:`fit` → :func:`evaluate` → :func:`export` → :func:`summarize`. Each
stage is a function of its inputs that returns a typed value; they log retrain.py's lines through
``logging`` and print nothing. Every output is written atomically.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer import __version__, storage
from lastlayer.config import CacheConfig, EngineConfig, OutputConfig, TrainingConfig, check, flat
from lastlayer.dataset import TESTING, TRAINING, VALIDATION, ImageFile, ImageSet, scan
from lastlayer.demo import demo_image_dir
from lastlayer.engines import make_engine
from lastlayer.engines.base import Engine
from lastlayer.errors import DataError, UsageError
from lastlayer.evaluate import accuracy, confusion_matrix, per_class_scores
from lastlayer.export import build_classifier
from lastlayer.features import Bottlenecks, compute_bottlenecks
from lastlayer.summaries import SummaryWriter
from lastlayer.summary import (
    CacheStats,
    ClassScores,
    Confusion,
    Metrics,
    Outputs,
    RunSummary,
    ShardResult,
    finite,
)
from lastlayer.train import Classifier, Evaluation, TrainConfig, train
from lastlayer.zoo import DEFAULT_ARCHITECTURE, FeatureModel, load_feature_model
from lastlayer.zoo.catalog import INT8_SUFFIX, is_user_model

if TYPE_CHECKING:
    from lastlayer.hadoop import HadoopLogin

log = logging.getLogger(__name__)

#: ``(done, total)`` images while bottlenecks are computed.
Progress = Callable[[int, int], None]
#: Called at each evaluation point of training (every ``--eval_step_interval`` steps and the last).
OnEvaluation = Callable[[Evaluation], None]
#: Seconds between looks at the cache while worker 0 waits for the other workers' shards.
SHARD_POLL_SECONDS = 2.0


def retrain(
    image_dir: str = "",
    *,
    architecture: str = DEFAULT_ARCHITECTURE,
    training: TrainingConfig | None = None,
    cache: CacheConfig | None = None,
    outputs: OutputConfig | None = None,
    engine: EngineConfig | None = None,
    storage_options: Mapping[str, Any] | None = None,
    hadoop: HadoopLogin | None = None,
    progress: Progress | None = None,
    on_evaluation: OnEvaluation | None = None,
) -> RunSummary | ShardResult:
    """Retrain the last layer of ``architecture`` on the class folders of ``image_dir``.

    Args:
        image_dir: a folder of class sub-folders of images (local path or fsspec URL); "" uses the
            bundled demo set.
        architecture: a zoo network name, or the path or URL of an ONNX feature extractor.
        training, cache, outputs, engine: the settings (defaults: retrain.py's).
        storage_options: passed to fsspec for every URL.
        hadoop: a :class:`~lastlayer.hadoop.HadoopLogin` for ``hdfs://`` URLs and Spark on a
            Kerberized cluster; its storage options come before ``storage_options``.
        progress: called with ``(done, total)`` while bottlenecks are computed.
        on_evaluation: called at each evaluation point of training.

    Returns:
        The run summary (also written to ``outputs.summary_url``), or, for a worker with
        ``engine.worker_index > 0``, what it cached of its shard.

    Raises:
        LastlayerError: for anything the user can fix (bad settings or data, storage, model, engine).
    """
    run = Run(
        image_dir, architecture, training or TrainingConfig(), cache or CacheConfig(),
        outputs or OutputConfig(), engine or EngineConfig(),
        {**(hadoop.storage_options() if hadoop else {}), **(storage_options or {})}, on_evaluation,
    )  # fmt: skip
    check(run.training, run.cache, run.outputs, run.engine)
    # the engine starts first: pyspark forks its JVM, which must not inherit other threads' locks
    with make_engine(run.engine, run.storage_options, hadoop.spark_conf() if hadoop else None) as engine:
        return _stages(run, engine, progress)


@dataclass
class Run:
    """The settings of one run, and the seconds each stage took so far."""

    image_dir: str
    architecture: str
    training: TrainingConfig
    cache: CacheConfig
    outputs: OutputConfig
    engine: EngineConfig
    storage_options: dict[str, Any]
    on_evaluation: OnEvaluation | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _started: float = field(init=False, default_factory=time.perf_counter)
    _tick: float = field(init=False, default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        """Record the seconds since the last lap as ``name``."""
        now = time.perf_counter()
        self.timings[name] = round(now - self._tick, 3)
        self._tick = now

    def total(self) -> None:
        """Record the whole run's seconds as ``total_s``."""
        self.timings["total_s"] = round(time.perf_counter() - self._started, 3)

    def options(self) -> dict[str, Any]:
        """Every setting by flag name."""
        settings = (self.training, self.cache, self.outputs, self.engine)
        return {
            "image_dir": self.image_dir,
            "architecture": self.architecture,
            **{k: v for config in settings for k, v in flat(config).items()},
        }


def _stages(run: Run, engine: Engine, progress: Progress | None) -> RunSummary | ShardResult:
    check_outputs(run.outputs, run.engine, run.storage_options)
    image_dir = run.image_dir or _demo()
    seed = run.training.random_seed if run.training.random_seed is not None else secrets.randbits(32)
    log.info("Random seed: %d", seed)
    model = load_model(run.architecture, run.cache.model_dir, run.storage_options)
    network = exported_network(model, run)
    run.lap("model_s")
    images = scan_images(image_dir, run.training, run.storage_options)
    run.lap("scan_s")
    bottlenecks = extract(images, model, run, engine, progress)
    if run.engine.worker_index > 0:
        return _shard_result(run.engine, model, bottlenecks)
    computed = bottlenecks.computed
    bottlenecks = wait_for_shards(images, model, run, engine, bottlenecks)
    run.lap("bottlenecks_s")
    data = TrainingData.of(images, bottlenecks)
    classifier, last = fit(data, model, images.labels, run, seed)
    run.lap("training_s")
    scores = evaluate(classifier, data, images, run.training.test_batch_size, seed, run.outputs)
    export(model, classifier, images.labels, run.outputs, seed, run.storage_options, network)
    run.lap("export_s")
    run.total()
    summary = summarize(run, image_dir, model, seed, images, data, computed, last, scores)
    storage.write_atomic(run.outputs.summary_url, summary.to_json().encode(), run.storage_options)
    return summary


def _demo() -> str:
    folder = demo_image_dir()
    log.info("No --image_dir given: using the bundled demo set (Fashion-MNIST sample) at %s", folder)
    return folder


# -- stages -------------------------------------------------------------------------------------
def check_outputs(
    outputs: OutputConfig, engine: EngineConfig, storage_options: Mapping[str, Any] | None
) -> None:
    """Refuse, before any work, outputs that cannot be written: a path that is a folder, under a file,
    or named twice.

    Raises:
        UsageError: naming the flag and what to do.
    """
    if engine.worker_index > 0:  # a shard worker writes only the cache
        return
    files = {
        "output_graph": outputs.output_graph,
        "output_labels": outputs.output_labels,
        "summary_json": outputs.summary_url,
    }
    for flag, url in files.items():
        if why := storage.file_problem(url, storage_options):
            raise UsageError(f"--{flag}={url}: {why}")
    seen: dict[str, str] = {}
    for flag, url in files.items():
        if url in seen:
            raise UsageError(f"--{flag}={url}: the same file as --{seen[url]}; give each output its own path")
        seen[url] = flag


def load_model(architecture: str, model_dir: str, storage_options: Mapping[str, Any] | None) -> FeatureModel:
    """The feature network (built and cached in ``model_dir`` on first use)."""
    model = load_feature_model(architecture, model_dir, storage_options)
    if model.warning:
        log.warning("%s", model.warning)
    log.info(
        "Architecture: %s (%d features, %d px input)",
        model.architecture,
        model.feature_size,
        model.preprocessing.size,
    )
    return model


def exported_network(model: FeatureModel, run: Run) -> FeatureModel:
    """The network ``--output_graph`` carries: ``model``, or with ``--quantize_output_graph`` its int8
    version (built and cached now, before the long stages).

    Raises:
        UsageError: ``--quantize_output_graph`` with a user model (only zoo networks have int8 versions).
    """
    name = model.architecture
    if not run.outputs.quantize_output_graph or name.endswith(INT8_SUFFIX) or run.engine.worker_index > 0:
        return model  # (a shard worker exports nothing)
    if is_user_model(name):
        raise UsageError(
            f"--quantize_output_graph: {name} is your own model and has no int8 version here; quantize "
            "it with onnxruntime's tools and pass that file as --architecture, or leave the flag out"
        )
    network = load_feature_model(name + INT8_SUFFIX, run.cache.model_dir, run.storage_options)
    log.info("The output graph will carry %s", network.architecture)
    return network


def scan_images(
    image_dir: str, training: TrainingConfig, storage_options: Mapping[str, Any] | None
) -> ImageSet:
    """The images of ``image_dir``, their labels and retrain.py's split."""
    images = scan(image_dir, training.testing_percentage, training.validation_percentage, storage_options)
    log.info(
        "Found %d images in %d classes: %s", len(images.files), len(images.labels), ", ".join(images.labels)
    )
    return images


def extract(
    images: ImageSet, model: FeatureModel, run: Run, engine: Engine, progress: Progress | None
) -> Bottlenecks:
    """The bottlenecks of this worker's shard: from the cache, else computed by ``engine``."""
    bottlenecks = _bottlenecks(images, model, run, engine, progress)
    log.info(
        "Bottlenecks: %d computed, %d from the cache, %d skipped",
        bottlenecks.computed,
        bottlenecks.reused,
        len(bottlenecks.skipped),
    )
    return bottlenecks


def _bottlenecks(
    images: ImageSet, model: FeatureModel, run: Run, engine: Engine, progress: Progress | None
) -> Bottlenecks:
    return compute_bottlenecks(
        images,
        model,
        run.cache.bottleneck_dir,
        engine,
        distortions=run.training.distortions,
        variants=run.cache.distorted_variants,
        storage_options=run.storage_options,
        progress=progress,
        shard=(run.engine.worker_index, run.engine.worker_count),
    )


def _shard_result(config: EngineConfig, model: FeatureModel, bottlenecks: Bottlenecks) -> ShardResult:
    log.info(
        "Worker %d of %d: its shard of the bottlenecks is cached; worker 0 trains",
        config.worker_index,
        config.worker_count,
    )
    cache = {"computed": bottlenecks.computed, "reused": bottlenecks.reused}
    return ShardResult(config.worker_index, config.worker_count, model.architecture, cache)


def wait_for_shards(
    images: ImageSet, model: FeatureModel, run: Run, engine: Engine, bottlenecks: Bottlenecks
) -> Bottlenecks:
    """Worker 0: look at the cache every :data:`SHARD_POLL_SECONDS` until the other workers' shards
    are in it; at most ``engine.shard_wait_seconds``.

    Raises:
        DataError: the shards did not arrive in time.
    """
    deadline = time.monotonic() + run.engine.shard_wait_seconds
    while bottlenecks.pending:
        if time.monotonic() > deadline:
            raise DataError(
                f"{bottlenecks.pending} images of other workers' shards are still not in "
                f"{run.cache.bottleneck_dir} after {run.engine.shard_wait_seconds:.0f} s: "
                "check the other workers' logs, then run again"
            )
        log.info(
            "Waiting for the other workers: %d images of their shards not cached yet", bottlenecks.pending
        )
        time.sleep(SHARD_POLL_SECONDS)
        bottlenecks = _bottlenecks(images, model, run, engine, None)
    return bottlenecks


@dataclass(frozen=True)
class TrainingData:
    """The usable images of each split as positions into the image set, their labels, and features.

    Attributes:
        index: split to ``int64 [N_split]`` positions in :attr:`ImageSet.files`.
        labels: split to ``int64 [N_split]`` class indices.
    """

    index: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    bottlenecks: Bottlenecks

    @classmethod
    def of(cls, images: ImageSet, bottlenecks: Bottlenecks) -> TrainingData:
        """The usable images of ``images``; every class must have training images.

        Raises:
            DataError: a class has no usable training image.
        """
        labels = np.array([f.label_index for f in images.files], np.int64)
        usable = bottlenecks.rows >= 0
        index = {
            split: np.array([i for i in images.indices(split) if usable[i]], np.int64)
            for split in (TRAINING, VALIDATION, TESTING)
        }
        data = cls(index, {split: labels[idx] for split, idx in index.items()}, bottlenecks)
        present = set(data.labels[TRAINING].tolist())
        missing = [label for i, label in enumerate(images.labels) if i not in present]
        if missing:
            raise DataError(
                f"class(es) {', '.join(repr(m) for m in missing)} have no usable training images: add images "
                "or lower --testing_percentage / --validation_percentage"
            )
        return data

    def x(self, split: str) -> np.ndarray:
        """``float32 [N_split, D]`` plain features."""
        return self.bottlenecks.plain[self.bottlenecks.rows[self.index[split]]]

    def sampler(self) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
        """Features of training positions ``[B]`` → ``float32 [B, D]``: one random cached distorted
        variant each when distortions are on, else the plain features."""
        b = self.bottlenecks
        if b.variant_rows is not None and b.distorted is not None:
            variant_rows, distorted = b.variant_rows[self.index[TRAINING]], b.distorted
            return lambda pos, rng: distorted[
                variant_rows[pos, rng.integers(0, variant_rows.shape[1], len(pos))]
            ]
        train_rows, plain = b.rows[self.index[TRAINING]], b.plain
        return lambda pos, rng: plain[train_rows[pos]]


def fit(
    data: TrainingData, model: FeatureModel, labels: tuple[str, ...], run: Run, seed: int
) -> tuple[Classifier, Evaluation | None]:
    """Train the softmax layer, writing TensorBoard summaries and intermediate models as it goes;
    return it and its last evaluation point."""
    outputs = run.outputs
    train_writer = SummaryWriter(storage.join(outputs.summaries_dir, "train"), run.storage_options)
    validation_writer = SummaryWriter(storage.join(outputs.summaries_dir, "validation"), run.storage_options)
    last: list[Evaluation] = []

    def on_eval(ev: Evaluation) -> None:
        last[:] = [ev]
        if run.on_evaluation is not None:
            run.on_evaluation(ev)
        train_writer.scalar("accuracy", ev.train_accuracy, ev.step)
        train_writer.scalar("cross_entropy", ev.cross_entropy, ev.step)
        if ev.validation_accuracy is not None and ev.validation_cross_entropy is not None:
            validation_writer.scalar("accuracy", ev.validation_accuracy, ev.step)
            validation_writer.scalar("cross_entropy", ev.validation_cross_entropy, ev.step)

    def on_checkpoint(step: int, clf: Classifier) -> None:
        freq = outputs.intermediate_store_frequency
        if freq > 0 and step > 0 and step % freq == 0:
            url = storage.join(outputs.intermediate_output_graphs_dir, f"intermediate_{step}.onnx")
            log.info("Save intermediate result to : %s", url)
            model_bytes = build_classifier(model, clf, labels, outputs.final_tensor_name)
            storage.write_atomic(url, model_bytes, run.storage_options)

    if not len(data.labels[VALIDATION]):
        log.warning("The validation set is empty: no validation accuracy (raise --validation_percentage)")
    t = run.training
    config = TrainConfig(
        t.how_many_training_steps,
        t.learning_rate,
        t.train_batch_size,
        t.eval_step_interval,
        t.validation_batch_size,
        seed,
    )
    with train_writer, validation_writer:
        clf = train(
            data.sampler(),
            data.labels[TRAINING],
            data.x(VALIDATION),
            data.labels[VALIDATION],
            model.feature_size,
            len(labels),
            config,
            on_eval,
            on_checkpoint,
        )
    return clf, (last[0] if last else None)


@dataclass(frozen=True)
class Scores:
    """How the classifier does on held-out images.

    Attributes:
        test_accuracy, test_n: on the ``--test_batch_size`` test images (all by default).
        accuracy_all: split to accuracy on the whole split; ``"held_out"`` for validation + test.
        held_out_n: validation + test images.
        confusion: ``int64 [C, C]`` on the whole test split.
    """

    test_accuracy: float | None
    test_n: int
    accuracy_all: dict[str, float | None]
    held_out_n: int
    confusion: np.ndarray


def evaluate(
    clf: Classifier,
    data: TrainingData,
    images: ImageSet,
    test_batch_size: int,
    seed: int,
    outputs: OutputConfig,
) -> Scores:
    """Score ``clf`` on the test images (retrain.py's "Final test accuracy"), on each whole split and
    on validation + test; log the misclassified test images when asked."""
    full_x, full_y = data.x(TESTING), data.labels[TESTING]
    test_x, test_y = full_x, full_y
    test_files: list[ImageFile] = [images.files[i] for i in data.index[TESTING]]
    if test_batch_size != -1 and len(test_y):
        pick = np.random.default_rng(seed + 1).integers(0, len(test_y), test_batch_size)
        test_x, test_y, test_files = test_x[pick], test_y[pick], [test_files[i] for i in pick]
    test_pred = clf.predict(test_x) if len(test_y) else np.zeros(0, np.int64)
    test_accuracy = float(np.mean(test_pred == test_y)) if len(test_y) else None
    if test_accuracy is None:
        log.warning("The test set is empty: no final test accuracy (raise --testing_percentage)")
    else:
        log.info("Final test accuracy = %.1f%% (N=%d)", test_accuracy * 100, len(test_y))
    if outputs.print_misclassified_test_images:
        log.info("=== MISCLASSIFIED TEST IMAGES ===")
        for f, pred, truth in zip(test_files, test_pred, test_y, strict=True):
            if pred != truth:
                log.info("%70s  %s", f.url, images.labels[pred])
    val_x, val_y = data.x(VALIDATION), data.labels[VALIDATION]
    held_out_y = np.concatenate([val_y, full_y])
    return Scores(
        test_accuracy,
        len(test_y),
        {
            TRAINING: accuracy(clf, data.x(TRAINING), data.labels[TRAINING]),
            VALIDATION: accuracy(clf, val_x, val_y),
            TESTING: accuracy(clf, full_x, full_y),
            "held_out": accuracy(clf, np.concatenate([val_x, full_x]), held_out_y),
        },
        len(held_out_y),
        confusion_matrix(full_y, clf.predict(full_x), len(images.labels)),
    )


def export(
    model: FeatureModel,
    clf: Classifier,
    labels: tuple[str, ...],
    outputs: OutputConfig,
    seed: int,
    storage_options: Mapping[str, Any] | None,
    network: FeatureModel | None = None,
) -> None:
    """Write the retrained model (carrying its labels and preprocessing) and the labels file.

    Args:
        model: the network whose features trained ``clf`` (its key goes into the metadata).
        network: the network the model carries, when not ``model`` (``--quantize_output_graph``).
    """
    extra = {"model_key": model.key, "seed": str(seed)}
    model_bytes = build_classifier(network or model, clf, labels, outputs.final_tensor_name, extra)
    storage.write_atomic(outputs.output_graph, model_bytes, storage_options)
    log.info("Save final result to : %s", outputs.output_graph)
    storage.write_atomic(outputs.output_labels, ("\n".join(labels) + "\n").encode(), storage_options)


def summarize(
    run: Run,
    image_dir: str,
    model: FeatureModel,
    seed: int,
    images: ImageSet,
    data: TrainingData,
    computed: int,
    last: Evaluation | None,
    scores: Scores,
) -> RunSummary:
    """The run summary: what was found, used, skipped and scored, and where it went."""
    precision, recall = per_class_scores(scores.confusion)
    bottlenecks = data.bottlenecks
    return RunSummary(
        lastlayer_version=__version__,
        architecture=model.architecture,
        architecture_requested=run.architecture,
        model_key=model.key,
        seed=seed,
        image_dir=image_dir,
        labels=list(images.labels),
        image_counts=images.counts(),
        images={
            "found": len(images.files),
            "used": int((bottlenecks.rows >= 0).sum()),
            "skipped": len(bottlenecks.skipped),
            **{split: len(positions) for split, positions in data.index.items()},
        },
        skipped=[{"path": path, "reason": reason} for path, reason in bottlenecks.skipped],
        metrics=Metrics(
            steps=run.training.how_many_training_steps,
            final_train_accuracy=last.train_accuracy if last else None,
            final_cross_entropy=last.cross_entropy if last else None,
            final_validation_accuracy=last.validation_accuracy if last else None,
            test_accuracy=scores.test_accuracy,
            test_n=scores.test_n,
            train_accuracy_all=scores.accuracy_all[TRAINING],
            validation_accuracy_all=scores.accuracy_all[VALIDATION],
            test_accuracy_all=scores.accuracy_all[TESTING],
            validation_and_test_accuracy=scores.accuracy_all["held_out"],
            validation_and_test_n=scores.held_out_n,
        ),
        confusion_matrix=Confusion(TESTING, "true label", "predicted label", scores.confusion.tolist()),
        per_class={
            label: ClassScores(finite(precision[i]), finite(recall[i]), int(scores.confusion[i].sum()))
            for i, label in enumerate(images.labels)
        },
        cache=CacheStats(computed, bottlenecks.reused, bottlenecks.damaged_files),
        timings=run.timings,
        outputs=Outputs(
            run.outputs.output_graph,
            run.outputs.output_labels,
            run.outputs.summaries_dir,
            run.outputs.summary_url,
        ),
        options=run.options(),
    )
