"""``retrain``: from an image folder to a model, labels, summaries and a run summary, as named stages.

:func:`retrain` runs :func:`load_model` → :func:`scan_images` → (:func:`plan_variants` →)
:func:`extract` (→ :func:`wait_for_shards`) → (:func:`cross_validate` →) :func:`fit` →
:func:`evaluate` → :func:`export` → :func:`summarize`. Each
stage is a function of its inputs that returns a typed value; they log retrain.py's lines through
``logging`` and print nothing. Every output is written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer import __version__, storage, stream
from lastlayer.cache import LOAD_ATTEMPTS, remove_damaged
from lastlayer.config import CacheConfig, EngineConfig, OutputConfig, TrainingConfig, check, flat
from lastlayer.dataset import TESTING, TRAINING, VALIDATION, ImageSet, scan
from lastlayer.demo import demo_image_dir
from lastlayer.engines import make_engine
from lastlayer.engines.base import Engine
from lastlayer.errors import DataError, UsageError
from lastlayer.evaluate import (
    CrossValidation,
    accuracy,
    balanced_accuracy,
    confusion_matrix,
    folds,
    largest_share,
    macro_f1,
    per_class_scores,
)
from lastlayer.export import build_classifier
from lastlayer.features import Bottlenecks, combine, compute_bottlenecks
from lastlayer.stream import DamagedCache, Predictions, RowStore
from lastlayer.summaries import SummaryWriter
from lastlayer.summary import (
    MAX_MISCLASSIFIED,
    CacheStats,
    ClassScores,
    Confusion,
    LearningCurve,
    Metrics,
    Misclassified,
    Outputs,
    RunSummary,
    ShardResult,
    finite,
)
from lastlayer.train import (
    Classifier,
    Evaluation,
    Standardizer,
    TrainConfig,
    draw_counts,
    train,
    validation_draws,
)
from lastlayer.trust import stage as trust
from lastlayer.trust.ood import ExportedDistance
from lastlayer.zoo import DEFAULT_ARCHITECTURE, Backbones, FeatureModel, load_backbones, load_feature_model
from lastlayer.zoo.catalog import INT8_SUFFIX, is_user_model

if TYPE_CHECKING:
    from lastlayer.hadoop import HadoopLogin

#: The run's lines keep the logger name they always had (``INFO:lastlayer.retrain:Final test accuracy``).
log = logging.getLogger("lastlayer.retrain")

#: ``(done, total)`` images while bottlenecks are computed.
Progress = Callable[[int, int], None]
#: Called at each evaluation point of training (every ``--eval_step_interval`` steps and the last).
OnEvaluation = Callable[[Evaluation], None]
#: Seconds between looks at the cache while worker 0 waits for the other workers' shards.
SHARD_POLL_SECONDS = 2.0
#: Folds of the label check without ``--cross_validation``.
LABEL_FOLDS = 5


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
        {**(hadoop.storage_options() if hadoop else {}), **(storage_options or {})},
    )  # fmt: skip
    run.on_evaluation = run.recorder(on_evaluation)
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
    history: list[Evaluation] = field(default_factory=list)
    _started: float = field(init=False, default_factory=time.perf_counter)
    _tick: float = field(init=False, default_factory=time.perf_counter)

    def recorder(self, then: OnEvaluation | None) -> OnEvaluation:
        """A callback that keeps each evaluation point in :attr:`history`, then calls ``then``."""

        def record(ev: Evaluation) -> None:
            self.history.append(ev)
            if then is not None:
                then(ev)

        return record

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
    model = load_model(
        run.architecture, run.cache.model_dir, run.storage_options, run.training.block_features
    )
    network = exported_network(model, run)
    run.lap("model_s")
    images = scan_images(image_dir, run.training, run.storage_options)
    run.lap("scan_s")
    draws = plan_variants(images, run, seed)
    bottlenecks = extract(images, model, run, engine, progress, draws)
    if run.engine.worker_index > 0:
        return _shard_result(run.engine, model, bottlenecks)
    bottlenecks = wait_for_shards(images, model, run, engine, bottlenecks, draws)
    with load(images, model, run, engine, bottlenecks, draws, seed) as data:
        run.lap("bottlenecks_s")
        folded = out_of_fold = None
        if run.training.cross_validation:
            folded, out_of_fold = cross_validate(data, images.labels, run.training, seed)
            run.lap("cross_validation_s")
        classifier, last = fit(data, model, images.labels, run, seed)
        run.lap("training_s")
        names = trust.Names(lambda at: [f.relpath for f in images.files.at(at)], images.labels)
        trusted = trust.analyse(
            data.bottlenecks,
            data.index,
            data.labels,
            classifier,
            trust_settings(run, seed),
            names,
            out_of_fold,
        )
        classifier = trusted.classifier
        run.lap("trust_s")
        scores = evaluate(classifier, data, images, run.training.test_batch_size, seed, run.outputs)
    export(model, classifier, images.labels, run.outputs, seed, run.storage_options, network, trusted.unknown)
    run.lap("export_s")
    run.total()
    wrong = misclassified(scores, data, images)
    summary = summarize(run, image_dir, model, seed, images, data, last, scores, wrong, folded)
    summary = dataclasses.replace(summary, trust=trusted.summary)
    storage.write_atomic(run.outputs.summary_url, summary.to_json().encode(), run.storage_options)
    if run.outputs.report:
        write_report(summary, run.storage_options)
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


def load_model(
    architecture: str,
    model_dir: str,
    storage_options: Mapping[str, Any] | None,
    block_features: bool,
) -> Backbones:
    """The feature network(s) of ``architecture`` (each built and cached in ``model_dir`` on first use)."""
    models = load_backbones(architecture, model_dir, storage_options, block_features)
    for model in models:
        if model.warning:
            log.warning("%s", model.warning)
        log.info(
            "Architecture: %s (%d features, %d px input)",
            model.architecture,
            model.feature_size,
            model.preprocessing.size,
        )
    return models


def exported_network(models: Backbones, run: Run) -> Backbones:
    """The network(s) ``--output_graph`` carries: ``models``, or with ``--quantize_output_graph`` their
    int8 versions (built and cached now, before the long stages).

    Raises:
        UsageError: ``--quantize_output_graph`` with a user model (only zoo networks have int8 versions).
    """
    if not run.outputs.quantize_output_graph or run.engine.worker_index > 0:
        return models  # (a shard worker exports nothing)
    int8 = []
    for model in models:
        name = model.architecture
        if name.endswith(INT8_SUFFIX):
            int8.append(model)
            continue
        if is_user_model(name):
            raise UsageError(
                f"--quantize_output_graph: {name} is your own model and has no int8 version here; quantize "
                "it with onnxruntime's tools and pass that file as --architecture, or leave the flag out"
            )
        int8.append(
            load_feature_model(
                name + INT8_SUFFIX, run.cache.model_dir, run.storage_options, run.training.block_features
            )
        )
    network = Backbones(tuple(int8))
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


def plan_variants(
    images: ImageSet, run: Run, seed: int, training: np.ndarray | None = None
) -> np.ndarray | None:
    """With distortions on: ``int64 [N]`` how often training will draw each image (replayed from the
    seeded sampler), so that only the distorted variants it draws are computed. ``None`` (every
    variant) without distortions, or when several workers share the work without ``--random_seed``
    (each would draw its own seed, hence its own plan).

    Args:
        training: the positions of the training images training will draw from (default: every
            training image; :func:`load` plans again without those found unusable).
    """
    if not run.training.distortions.enabled:
        return None
    if run.engine.worker_count > 1 and run.training.random_seed is None:
        return None
    positions = images.indices(TRAINING) if training is None else training
    labels = images.label_index[positions].astype(np.int64)
    draws = np.zeros(len(images.files), np.int64)
    draws[positions] = draw_counts(labels, len(images.labels), _train_config(run.training, seed))
    return draws


def extract(
    images: ImageSet,
    model: Backbones,
    run: Run,
    engine: Engine,
    progress: Progress | None,
    draws: np.ndarray | None = None,
) -> Bottlenecks:
    """The bottlenecks of this worker's shard, each network's from its cache, else computed by
    ``engine``; several networks' side by side (:func:`~lastlayer.features.combine`)."""
    parts = []
    for branch in model:
        part = _bottlenecks(images, branch, run, engine, progress, draws)
        log.info(
            "Bottlenecks: %d computed, %d from the cache, %d skipped%s",
            part.computed,
            part.reused,
            len(part.skipped),
            f" ({branch.architecture})" if len(model) > 1 else "",
        )
        parts.append(part)
    return combine(parts)


def _bottlenecks(
    images: ImageSet,
    model: FeatureModel,
    run: Run,
    engine: Engine,
    progress: Progress | None,
    draws: np.ndarray | None,
) -> Bottlenecks:
    return compute_bottlenecks(
        images,
        model,
        run.cache.bottleneck_dir,
        engine,
        distortions=run.training.distortions,
        variants=run.cache.distorted_variants,
        draws=draws,
        storage_options=run.storage_options,
        progress=progress,
        shard=(run.engine.worker_index, run.engine.worker_count),
    )


def _shard_result(config: EngineConfig, model: Backbones, bottlenecks: Bottlenecks) -> ShardResult:
    log.info(
        "Worker %d of %d: its shard of the bottlenecks is cached; worker 0 trains",
        config.worker_index,
        config.worker_count,
    )
    cache = {"computed": bottlenecks.computed, "reused": bottlenecks.reused}
    return ShardResult(config.worker_index, config.worker_count, model.architecture, cache)


def wait_for_shards(
    images: ImageSet,
    model: Backbones,
    run: Run,
    engine: Engine,
    bottlenecks: Bottlenecks,
    draws: np.ndarray | None = None,
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
        bottlenecks = combine([_bottlenecks(images, branch, run, engine, None, draws) for branch in model])
    return bottlenecks


def load(
    images: ImageSet,
    model: Backbones,
    run: Run,
    engine: Engine,
    bottlenecks: Bottlenecks,
    draws: np.ndarray | None,
    seed: int,
) -> TrainingData:
    """The training data, its pass before training done (:meth:`TrainingData.prepare`) for the final
    fit and the folds of ``--cross_validation``.

    Goes back to extraction, computing everything missing itself (even other workers' shares), when
    that pass finds a cache file damaged (removed: its images are computed again) or gone (another
    process merged it), up to :data:`~lastlayer.cache.LOAD_ATTEMPTS` times; and, with distortions on,
    when training images found unusable change what training draws (planned again without them).

    Raises:
        DataError: a class has no usable training image, fewer images than folds, or the cache kept
            changing under the run.
    """
    computed, damaged, attempts = bottlenecks.computed, bottlenecks.damaged_files, 0
    planned = images.indices(TRAINING)
    whole = dataclasses.replace(run, engine=dataclasses.replace(run.engine, worker_index=0, worker_count=1))
    while True:
        data = TrainingData.of(images, bottlenecks)
        if draws is not None and not np.array_equal(planned, data.index[TRAINING]):
            planned = data.index[TRAINING]
            draws = plan_variants(images, run, seed, planned)
        else:
            try:
                data.prepare([final_fit(data, run.training, seed), *fold_fits(data, run.training, seed)[0]])
                break
            except DamagedCache as exc:
                attempts += 1
                damaged += _forget(exc, run, attempts)
        bottlenecks = extract(images, model, whole, engine, None, draws)
        computed += bottlenecks.computed
        damaged += bottlenecks.damaged_files
    found = len(images.files) - len(bottlenecks.skipped) - bottlenecks.pending
    cache = dataclasses.replace(
        bottlenecks, computed=computed, reused=found - computed, damaged_files=damaged
    )
    return dataclasses.replace(data, bottlenecks=cache)


def _forget(exc: DamagedCache, run: Run, attempts: int) -> int:
    """Remove the damaged files of ``exc`` (their images are computed again); how many.

    Raises:
        DataError: this was the :data:`~lastlayer.cache.LOAD_ATTEMPTS` th attempt.
    """
    if attempts >= LOAD_ATTEMPTS:
        raise DataError(
            f"the bottleneck cache in {run.cache.bottleneck_dir} changed {attempts} times while this run "
            f"read it ({exc}): run again once the other runs sharing it are done"
        ) from exc
    damaged = [part for part in exc.parts if not part.vanished]
    for part in damaged:
        remove_damaged(part.url, run.storage_options)
    return len(damaged)


@dataclass(frozen=True)
class Fit:
    """One training of the last layer: its training and validation images and its settings.

    Attributes:
        name: ``"final"``, or ``"fold F"`` of a cross-validation.
        positions: ``int64 [n]`` its training images (positions in the image set, the order its
            sampler draws from).
        labels: ``int64 [n]`` their classes.
        val_positions, val_labels: its validation images, likewise.
        config: its settings.
    """

    name: str
    positions: np.ndarray
    labels: np.ndarray
    val_positions: np.ndarray
    val_labels: np.ndarray
    config: TrainConfig

    @property
    def key(self) -> tuple[str, TrainConfig]:
        """What tells it apart from the other fits of a run."""
        return self.name, self.config


def final_fit(data: TrainingData, training: TrainingConfig, seed: int) -> Fit:
    """The training of the model the run exports: on the training split, validated on the validation
    split."""
    return Fit(
        "final",
        data.index[TRAINING],
        data.labels[TRAINING],
        data.index[VALIDATION],
        data.labels[VALIDATION],
        _train_config(training, seed),
    )


def fold_fits(
    data: TrainingData, training: TrainingConfig, seed: int
) -> tuple[list[Fit], np.ndarray, np.ndarray, np.ndarray]:
    """The trainings of ``--cross_validation K`` (none without it), each on every image with features
    but one stratified, seeded fold; and the images, their classes and the fold of each.

    Raises:
        DataError: fewer such images than folds.
    """
    k = training.cross_validation
    positions = np.concatenate([data.index[s] for s in (TRAINING, VALIDATION, TESTING)])
    truth = np.concatenate([data.labels[s] for s in (TRAINING, VALIDATION, TESTING)])
    if not k:
        return [], positions[:0], truth[:0], truth[:0]
    kept = data.bottlenecks.first_rows(positions) >= 0  # (with distortions: the images training draws)
    positions, truth = positions[kept], truth[kept]
    if len(truth) < k:
        raise DataError(
            f"--cross_validation={k} needs at least {k} usable images, and there are {len(truth)}: "
            "lower --cross_validation or add images"
        )
    fold_of = folds(truth, k, seed)
    config = _train_config(training, seed, log_steps=False)
    none = np.zeros(0, np.int64)
    fits = [
        Fit(f"fold {f}", positions[fold_of != f], truth[fold_of != f], none, none, config) for f in range(k)
    ]
    return fits, positions, truth, fold_of


@dataclass(frozen=True)
class TrainingData:
    """The usable images of each split as positions into the image set, their labels, and where
    their features are; once :meth:`prepare` d, the statistics and gathered rows of its fits.

    Attributes:
        index: split to ``int64 [N_split]`` positions in :attr:`ImageSet.files`.
        labels: split to ``int64 [N_split]`` class indices.
        classes: the number of classes C.
    """

    index: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    bottlenecks: Bottlenecks
    classes: int
    _prepared: dict[tuple[str, TrainConfig], tuple[Standardizer, RowStore]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def of(cls, images: ImageSet, bottlenecks: Bottlenecks) -> TrainingData:
        """The usable images of ``images``; every class must have training images.

        Raises:
            DataError: a class has no usable training image.
        """
        index = {
            split: images.indices(split)[bottlenecks.usable[images.indices(split)]]
            for split in (TRAINING, VALIDATION, TESTING)
        }
        labels = {split: images.label_index[idx].astype(np.int64) for split, idx in index.items()}
        data = cls(index, labels, bottlenecks, len(images.labels))
        present = set(data.labels[TRAINING].tolist())
        missing = [label for i, label in enumerate(images.labels) if i not in present]
        if missing:
            raise DataError(
                f"class(es) {', '.join(repr(m) for m in missing)} have no usable training images: add images "
                "or lower --testing_percentage / --validation_percentage"
            )
        return data

    def prepare(self, fits: list[Fit]) -> None:
        """The pass before training (:func:`lastlayer.stream.load`) for those of ``fits`` not prepared
        yet: each one's standardizer, from the rows that stand for its training images (grouped by
        which fits each image belongs to), the rows its draws and validation batches will read, and a
        check of every file the evaluations will read.

        Raises:
            DamagedCache: a file is damaged or gone.
        """
        todo = [f for f in fits if f.key not in self._prepared]
        if not todo:
            return
        b = self.bottlenecks
        images = np.unique(np.concatenate([f.positions for f in todo]))
        member = np.packbits(np.stack([np.isin(images, f.positions) for f in todo], axis=1), axis=1)
        groups, group_of = np.unique(member, axis=0, return_inverse=True)
        ids, owner = b.representation(images)
        gather = np.concatenate([self._read_by(f) for f in todo])
        usable = np.concatenate(list(self.index.values()))
        check = b.first_rows(usable)
        statistics = (ids, group_of.reshape(-1)[owner], len(groups))
        moments, store = stream.load(b, statistics, gather, check[check >= 0])
        belongs = np.unpackbits(groups, axis=1)
        for j, fit in enumerate(todo):
            mean, std = moments.merged(np.flatnonzero(belongs[:, j]).tolist())
            self._prepared[fit.key] = (Standardizer.from_statistics(mean, std), store)

    def _read_by(self, fit: Fit) -> np.ndarray:
        """The ids of the rows training ``fit`` reads: every row standing for an image it draws, and
        the validation images of its batches."""
        drawn = draw_counts(fit.labels, self.classes, fit.config) > 0
        ids, _ = self.bottlenecks.representation(fit.positions[drawn])
        scored = np.unique(validation_draws(fit.val_labels, self.classes, fit.config))
        return np.concatenate([ids, fit.val_positions[scored]])

    def train(
        self,
        fit: Fit,
        on_eval: Callable[[Evaluation], None] | None = None,
        on_checkpoint: Callable[[int, Classifier], None] | None = None,
    ) -> Classifier:
        """:func:`~lastlayer.train.train` for ``fit``, on the rows :meth:`prepare` gathered,
        standardized with its training images' statistics."""
        self.prepare([fit])
        standardizer, store = self._prepared[fit.key]
        return train(
            self._sampler(fit, store),
            fit.labels,
            lambda positions: store.get(fit.val_positions[positions]),
            fit.val_labels,
            self.bottlenecks.dim,
            self.classes,
            fit.config,
            on_eval,
            on_checkpoint,
            standardizer,
        )

    def _sampler(self, fit: Fit, store: RowStore) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
        """Features of training positions ``[B]`` → ``float32 [B, D]``: with distortions on, one of
        the image's cached distorted variants at random (its plain features when it has none), else
        the plain features."""
        b, images = self.bottlenecks, fit.positions
        if not len(b.variant_images):
            return lambda pos, rng: store.get(images[pos])
        start, count = b.variant_range(images)
        n = len(b.plain)

        def sample(pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            k = (rng.random(len(pos)) * count[pos]).astype(np.int64)
            return store.get(np.where(count[pos] > 0, n + start[pos] + k, images[pos]))

        return sample

    def predict(
        self, classifiers: list[Classifier], positions: np.ndarray, truth: np.ndarray, which: np.ndarray
    ) -> Predictions:
        """What ``classifiers[which[i]]`` says of the image at ``positions[i]`` (of class ``truth[i]``),
        from the first row standing for it (its plain features, or with distortions on, a training
        image's first variant); every image must have one."""
        ids = self.bottlenecks.first_rows(positions)
        return stream.predict(self.bottlenecks, ids, classifiers, which, truth)

    def close(self) -> None:
        """Remove the gathered rows' temporary files."""
        for _, store in self._prepared.values():
            store.close()

    def __enter__(self) -> TrainingData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fit(
    data: TrainingData, model: Backbones, labels: tuple[str, ...], run: Run, seed: int
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
    with train_writer, validation_writer:
        saving = on_checkpoint if outputs.intermediate_store_frequency > 0 else None
        with np.errstate(over="ignore", invalid="ignore"):  # a divergence is reported just below
            clf = data.train(final_fit(data, run.training, seed), on_eval, saving)
    if not (np.isfinite(clf.weights).all() and np.isfinite(clf.biases).all()):
        raise DataError(
            f"training diverged (the last layer's weights are not numbers) with --learning_rate="
            f"{run.training.learning_rate:g}: lower --learning_rate; no model was written"
        )
    return clf, (last[0] if last else None)


def trust_settings(run: Run, seed: int) -> trust.Settings:
    """The trust stage's flags."""
    t = run.training
    return trust.Settings(
        t.calibrate,
        t.unknown_recall,
        t.unknown_label,
        run.outputs.unknown_output,
        t.find_label_issues,
        t.cross_validation or LABEL_FOLDS,
        seed,
        t.find_duplicates,
    )


def _train_config(training: TrainingConfig, seed: int, log_steps: bool = True) -> TrainConfig:
    t = training
    return TrainConfig(
        t.how_many_training_steps,
        t.learning_rate,
        t.train_batch_size,
        t.eval_step_interval,
        t.validation_batch_size,
        seed,
        t.balance_classes,
        log_steps,
    )


def cross_validate(
    data: TrainingData, labels: tuple[str, ...], training: TrainingConfig, seed: int
) -> tuple[CrossValidation, trust.OutOfFold]:
    """Refit the last layer ``--cross_validation`` K times, each on all usable images but one fold
    (stratified, seeded) with the run's settings, and score it on that fold; log the summary and
    return it with the fold classifiers (for calibration). With distortions on, the training images
    are trained and scored on their variants.

    Raises:
        DataError: fewer usable images than folds.
    """
    fits, positions, truth, fold_of = fold_fits(data, training, seed)
    k = len(fits)
    classifiers = [data.train(fit) for fit in fits]
    predicted = data.predict(classifiers, positions, truth, fold_of).predicted
    confusions = [
        confusion_matrix(truth[fold_of == f], predicted[fold_of == f], len(labels)) for f in range(k)
    ]
    result = CrossValidation.of(confusions, largest_share(truth, len(labels)) or 0.0)
    log.info(
        "Cross-validation, %d folds of %d images: accuracy %.1f%% ± %.1f, balanced accuracy %.1f%% ± %.1f, "
        "macro-F1 %.1f%% ± %.1f (always answering the largest class: %.1f%%)",
        k,
        result.images,
        *(
            100 * v
            for s in (result.accuracy, result.balanced_accuracy, result.macro_f1)
            for v in (s.mean, s.std)
        ),
        100 * result.largest_class_share,
    )
    return result, trust.OutOfFold(positions, truth, fold_of, classifiers)


@dataclass(frozen=True)
class Scores:
    """How the classifier does on held-out images.

    Attributes:
        test_accuracy, test_n: on the ``--test_batch_size`` test images (all by default).
        accuracy_all: split to accuracy on the whole split; ``"held_out"`` for validation + test.
        held_out_n: validation + test images.
        confusion: ``int64 [C, C]`` on the whole test split.
        balanced_accuracy, macro_f1: on the whole test split.
        largest_class, largest_share: the whole test split's most frequent class and its share.
        test: the predictions for the whole test split.
    """

    test_accuracy: float | None
    test_n: int
    accuracy_all: dict[str, float | None]
    held_out_n: int
    confusion: np.ndarray
    balanced_accuracy: float | None
    macro_f1: float | None
    largest_class: int | None
    largest_share: float | None
    test: Predictions


def evaluate(
    clf: Classifier,
    data: TrainingData,
    images: ImageSet,
    test_batch_size: int,
    seed: int,
    outputs: OutputConfig,
) -> Scores:
    """Score ``clf`` on the test images (retrain.py's "Final test accuracy"), on each whole split and
    on validation + test (one pass over the cache); log the misclassified test images when asked.
    With distortions on, the training split is scored on its images' first variants (those training
    drew)."""
    test, predicted = _predict_splits(clf, data)
    full_y = data.labels[TESTING]
    test_pred, test_y, test_positions = test.predicted, full_y, data.index[TESTING]
    if test_batch_size != -1 and len(test_y):
        pick = np.random.default_rng(seed + 1).integers(0, len(test_y), test_batch_size)
        test_pred, test_y, test_positions = test_pred[pick], test_y[pick], test_positions[pick]
    test_accuracy = accuracy(test_pred, test_y)
    if test_accuracy is None:
        log.warning("The test set is empty: no final test accuracy (raise --testing_percentage)")
    else:
        log.info("Final test accuracy = %.1f%% (N=%d)", test_accuracy * 100, len(test_y))
    if outputs.print_misclassified_test_images:
        log.info("=== MISCLASSIFIED TEST IMAGES ===")
        wrong = np.flatnonzero(test_pred != test_y)
        for f, pred in zip(images.files.at(test_positions[wrong]), test_pred[wrong].tolist(), strict=True):
            log.info("%70s  %s", f.url, images.labels[pred])
    held_out = [np.concatenate([predicted[s][i] for s in (VALIDATION, TESTING)]) for i in (0, 1)]
    confusion = confusion_matrix(full_y, test.predicted, len(images.labels))
    balanced, f1, biggest, largest = _class_balance(confusion, images.labels)
    return Scores(
        test_accuracy,
        len(test_y),
        {
            **{split: accuracy(p, truth) for split, (p, truth) in predicted.items()},
            "held_out": accuracy(*held_out),
        },
        len(held_out[1]),
        confusion,
        balanced,
        f1,
        biggest,
        largest,
        test,
    )


def _predict_splits(
    clf: Classifier, data: TrainingData
) -> tuple[Predictions, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """From one pass: the test split's predictions, and each split's predicted and true classes (of
    the images with features: with distortions on, the training images that training draws)."""
    kept = {s: data.bottlenecks.first_rows(data.index[s]) >= 0 for s in (TRAINING, VALIDATION, TESTING)}
    positions = np.concatenate([data.index[s][kept[s]] for s in kept])
    truth = np.concatenate([data.labels[s][kept[s]] for s in kept])
    predictions = data.predict([clf], positions, truth, np.zeros(len(positions), np.int64))
    bounds = np.cumsum([0, *(int(k.sum()) for k in kept.values())])
    split = {s: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(kept)}
    return predictions[split[TESTING]], {s: (predictions.predicted[at], truth[at]) for s, at in split.items()}


def _class_balance(
    confusion: np.ndarray, labels: tuple[str, ...]
) -> tuple[float | None, float | None, int | None, float | None]:
    """Balanced accuracy, macro-F1, the most frequent class and its share on the split of
    ``confusion`` (all ``None`` when it is empty); logged beside the accuracy."""
    support = confusion.sum(axis=1)
    if not support.any():
        return None, None, None, None
    balanced, f1 = balanced_accuracy(confusion), macro_f1(confusion)
    biggest = int(np.argmax(support))
    share = float(support[biggest] / support.sum())
    log.info(
        "Balanced accuracy = %.1f%%, macro-F1 = %.1f%% (N=%d); always answering the largest class "
        "(%s) would score %.1f%%",
        100 * (balanced or 0.0),
        100 * (f1 or 0.0),
        support.sum(),
        labels[biggest],
        100 * share,
    )
    return balanced, f1, biggest, share


def export(
    model: Backbones,
    clf: Classifier,
    labels: tuple[str, ...],
    outputs: OutputConfig,
    seed: int,
    storage_options: Mapping[str, Any] | None,
    network: Backbones | None = None,
    unknown: ExportedDistance | None = None,
) -> None:
    """Write the retrained model (carrying its labels and preprocessing) and the labels file.

    Args:
        model: the network(s) whose features trained ``clf`` (their key goes into the metadata).
        network: the network(s) the model carries, when not ``model`` (``--quantize_output_graph``).
        unknown: its "none of the above" score, when on.
    """
    extra = {"model_key": model.key, "seed": str(seed)}
    model_bytes = build_classifier(network or model, clf, labels, outputs.final_tensor_name, extra, unknown)
    storage.write_atomic(outputs.output_graph, model_bytes, storage_options)
    log.info("Save final result to : %s", outputs.output_graph)
    storage.write_atomic(outputs.output_labels, ("\n".join(labels) + "\n").encode(), storage_options)


def misclassified(scores: Scores, data: TrainingData, images: ImageSet) -> list[Misclassified]:
    """The whole test split's mistakes, worst (lowest probability of the true class) first, at most
    :data:`~lastlayer.summary.MAX_MISCLASSIFIED`."""
    truth, test = data.labels[TESTING], scores.test
    wrong = np.flatnonzero(test.predicted != truth)
    worst = wrong[np.argsort(test.true_probability[wrong], kind="stable")][:MAX_MISCLASSIFIED]
    positions, labels = data.index[TESTING], images.labels
    return [
        Misclassified(
            images.files[positions[i]].relpath,
            labels[truth[i]],
            labels[test.predicted[i]],
            finite(test.confidence[i]),
            finite(test.true_probability[i]),
        )
        for i in worst
    ]


def write_report(summary: RunSummary, storage_options: Mapping[str, Any] | None) -> None:
    """Write the run's HTML report to ``summary.outputs.report``, or warn when the report's
    libraries are not installed."""
    from lastlayer import report

    if (missing := report.missing_libraries()) is not None:
        log.warning("No report written: %s", missing)
        return
    report.write(summary.to_dict(), summary.outputs.report, storage_options)
    log.info("Save report to : %s", summary.outputs.report)


def summarize(
    run: Run,
    image_dir: str,
    model: Backbones,
    seed: int,
    images: ImageSet,
    data: TrainingData,
    last: Evaluation | None,
    scores: Scores,
    wrong: list[Misclassified],
    cross_validation: CrossValidation | None = None,
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
            "used": int(bottlenecks.usable.sum()),
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
            test_balanced_accuracy=_rounded(scores.balanced_accuracy),
            test_macro_f1=_rounded(scores.macro_f1),
            largest_class=None if scores.largest_class is None else images.labels[scores.largest_class],
            largest_class_share=_rounded(scores.largest_share),
            cross_validation=cross_validation,
        ),
        confusion_matrix=Confusion(TESTING, "true label", "predicted label", scores.confusion.tolist()),
        per_class={
            label: ClassScores(finite(precision[i]), finite(recall[i]), int(scores.confusion[i].sum()))
            for i, label in enumerate(images.labels)
        },
        cache=CacheStats(bottlenecks.computed, bottlenecks.reused, bottlenecks.damaged_files),
        timings=run.timings,
        outputs=Outputs(
            run.outputs.output_graph,
            run.outputs.output_labels,
            run.outputs.summaries_dir,
            run.outputs.summary_url,
            run.outputs.report_url if run.outputs.report else "",
        ),
        options=run.options(),
        learning_curve=learning_curve(run.history),
        misclassified=wrong,
    )


def learning_curve(history: list[Evaluation]) -> LearningCurve:
    """The evaluation points of training as columns."""

    def column(values: list[float | None]) -> list[float | None]:
        return [_rounded(v) for v in values]

    return LearningCurve(
        [ev.step for ev in history],
        column([ev.train_accuracy for ev in history]),
        column([ev.cross_entropy for ev in history]),
        column([ev.validation_accuracy for ev in history]),
        column([ev.validation_cross_entropy for ev in history]),
    )


def _rounded(x: float | None) -> float | None:
    return None if x is None else finite(x)
