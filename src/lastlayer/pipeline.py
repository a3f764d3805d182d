"""``retrain`` and ``extract_shard``: from an image folder to a model, labels, summaries and a run
summary, as named stages.

:func:`_stages` is the one list of a run's stages, in order: :func:`check_outputs` →
:func:`load_model` (→ :func:`exported_network`) → :func:`scan_images` →
:func:`~lastlayer.training.data.plan_variants` → :func:`~lastlayer.bottlenecks.extraction.extract` →
:func:`~lastlayer.bottlenecks.extraction.wait_for_shards` → :func:`~lastlayer.training.data.load` →
(:func:`~lastlayer.training.fit.cross_validate` →) :func:`~lastlayer.training.fit.fit_final` →
:func:`~lastlayer.trust.stage.analyse` → :func:`~lastlayer.training.evaluate.evaluate` →
:func:`~lastlayer.model.export.write_model` →
:meth:`RunSummary.of <lastlayer.summary.RunSummary.of>` → :meth:`~lastlayer.summary.RunSummary.write`.
A worker with ``worker_index > 0`` runs the first five only (:func:`extract_shard`). Each stage is a
function of its inputs that returns a typed value; they log retrain.py's lines through ``logging``
and print nothing. Every output is written atomically.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from threadpoolctl import threadpool_limits

from lastlayer import storage
from lastlayer.bottlenecks.extraction import Progress, Source, extract, wait_for_shards
from lastlayer.bottlenecks.needs import Bottlenecks
from lastlayer.dataset import ImageSet
from lastlayer.demo import demo_image_dir
from lastlayer.engines import make_engine
from lastlayer.errors import UsageError
from lastlayer.labels import image_set
from lastlayer.model.export import write_model
from lastlayer.settings.run import CacheConfig, EngineConfig, OutputConfig, TrainingConfig, flat
from lastlayer.summary import RunSummary, ShardResult
from lastlayer.training.data import load, plan_variants
from lastlayer.training.evaluate import evaluate
from lastlayer.training.fit import OnEvaluation, cross_validate, fit_final
from lastlayer.training.train import Evaluation
from lastlayer.trust import stage as trust
from lastlayer.zoo import DEFAULT_ARCHITECTURE, Backbones, load_backbones, load_feature_model
from lastlayer.zoo.catalog import INT8_SUFFIX, is_user_model

if TYPE_CHECKING:
    from lastlayer.engines.base import Engine
    from lastlayer.hadoop import HadoopLogin

#: The run's lines keep the logger name they always had (``INFO:lastlayer.retrain:Final test accuracy``).
log = logging.getLogger("lastlayer.retrain")


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
) -> RunSummary:
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
        The run summary (also written to ``outputs.summary_url``).

    Raises:
        LastlayerError: for anything the user can fix (bad settings or data, storage, model, engine);
            a :class:`~lastlayer.errors.UsageError` for ``engine.worker_index > 0`` (a worker runs
            :func:`extract_shard`).
    """
    run = Run.of(image_dir, architecture, training, cache, outputs, engine, storage_options, hadoop)
    run.on_evaluation = run.recorder(on_evaluation)
    if run.engine.worker_index > 0:
        raise UsageError(
            f"--worker_index={run.engine.worker_index}: a worker other than 0 only computes its shard of "
            "the bottlenecks: call lastlayer.extract_shard() (the command line does), not retrain()"
        )
    # the engine starts first: pyspark forks its JVM, which must not inherit other threads' locks
    with make_engine(run.engine, run.storage_options, hadoop.spark_conf() if hadoop else None) as engine:
        return _stages(run, engine, progress)


def extract_shard(
    image_dir: str = "",
    *,
    architecture: str = DEFAULT_ARCHITECTURE,
    training: TrainingConfig | None = None,
    cache: CacheConfig | None = None,
    engine: EngineConfig | None = None,
    storage_options: Mapping[str, Any] | None = None,
    hadoop: HadoopLogin | None = None,
    progress: Progress | None = None,
) -> ShardResult:
    """Worker ``engine.worker_index > 0`` of ``engine.worker_count``: compute and cache this worker's
    shard of the bottlenecks of ``image_dir``; worker 0 (:func:`retrain`) waits for it, then trains.

    The arguments are :func:`retrain`'s (a worker writes only the cache).

    Raises:
        LastlayerError: as :func:`retrain`; a :class:`~lastlayer.errors.UsageError` for worker 0.
    """
    run = Run.of(image_dir, architecture, training, cache, None, engine, storage_options, hadoop)
    if run.engine.worker_index == 0:
        raise UsageError("--worker_index=0: worker 0 trains: call lastlayer.retrain(), not extract_shard()")
    with make_engine(run.engine, run.storage_options, hadoop.spark_conf() if hadoop else None) as engine:
        image_dir, seed, model = _prologue(run)
        images = scan_images(image_dir, run.training, run.storage_options)
        draws = plan_variants(images, run.training, run.engine.worker_count, seed)
        bottlenecks = extract(images, model, engine, run.source(), progress, draws)
        return _shard_result(run.engine, model, bottlenecks)


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

    @classmethod
    def of(
        cls,
        image_dir: str,
        architecture: str,
        training: TrainingConfig | None,
        cache: CacheConfig | None,
        outputs: OutputConfig | None,
        engine: EngineConfig | None,
        storage_options: Mapping[str, Any] | None,
        hadoop: HadoopLogin | None,
    ) -> Run:
        """The settings given to :func:`retrain` (defaults for those left out); the login's storage
        options come before ``storage_options``."""
        return cls(
            image_dir, architecture, training or TrainingConfig(), cache or CacheConfig(),
            outputs or OutputConfig(), engine or EngineConfig(),
            {**(hadoop.storage_options() if hadoop else {}), **(storage_options or {})},
        )  # fmt: skip

    def source(self) -> Source:
        """Where this run's bottlenecks are cached and which of them this worker computes."""
        return Source(
            self.cache.bottleneck_dir,
            self.training.distortions,
            self.cache.distorted_variants,
            (self.engine.worker_index, self.engine.worker_count),
            self.storage_options,
        )

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


def _stages(run: Run, engine: Engine, progress: Progress | None) -> RunSummary:
    """Worker 0's run: every stage, in order."""
    check_outputs(run.outputs, run.engine, run.storage_options)
    image_dir, seed, model = _prologue(run)
    t = run.training
    network = exported_network(
        model, run.outputs.quantize_output_graph, run.cache.model_dir, run.storage_options, t.block_features
    )
    run.lap("model_s")
    images = scan_images(image_dir, t, run.storage_options)
    run.lap("scan_s")
    source = run.source()
    draws = plan_variants(images, t, run.engine.worker_count, seed)
    bottlenecks = extract(images, model, engine, source, progress, draws)
    bottlenecks = wait_for_shards(
        images, model, engine, source, bottlenecks, run.engine.shard_wait_seconds, draws
    )
    # BLAS on one thread for training's small products: its spinning threads made them 40x slower under load
    with (
        load(images, model, engine, source, bottlenecks, draws, t, seed) as data,
        threadpool_limits(1, "blas"),
    ):
        run.lap("bottlenecks_s")
        folded = out_of_fold = None
        if t.cross_validation:
            folded, out_of_fold = cross_validate(data, images.labels, t, seed)
            run.lap("cross_validation_s")
        classifier, multi = fit_final(
            data, model, images, t, run.outputs, run.storage_options, seed, run.on_evaluation
        )
        run.lap("training_s")
        settings = trust.Settings.of(t, run.outputs, seed)
        trusted = trust.analyse(data, classifier, settings, trust.Names.of(images), out_of_fold)
        run.lap("trust_s")
        scores = (
            multi.scores
            if multi
            else evaluate(trusted.classifier, data, images, t.test_batch_size, seed, run.outputs)
        )
    write_model(
        model,
        trusted.classifier,
        images.labels,
        run.outputs,
        seed,
        run.storage_options,
        data.exported(network),
        trusted.unknown,
        multi.thresholds if multi else None,
    )
    run.lap("export_s")
    run.total()
    summary = RunSummary.of(
        requested=run.architecture,
        image_dir=image_dir,
        model=model,
        seed=seed,
        images=images,
        data=data,
        history=run.history,
        scores=scores,
        cross_validation=folded,
        steps=t.how_many_training_steps,
        timings=run.timings,
        outputs=run.outputs,
        options=run.options(),
        trust=trusted.summary,
        multi_label=multi.multi if multi else None,
    )
    summary.write(run.storage_options, trust.memo.Memo.of(data.bottlenecks))
    return summary


def _prologue(run: Run) -> tuple[str, int, Backbones]:
    """What every worker does first: the image folder (the demo set when none is named), the seed
    (drawn when not given) and the feature network(s)."""
    image_dir = run.image_dir or _demo()
    seed = run.training.random_seed if run.training.random_seed is not None else secrets.randbits(32)
    log.info("Random seed: %d", seed)
    model = load_model(run.architecture, run.cache.model_dir, run.storage_options, run.training)
    return image_dir, seed, model


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
    training: TrainingConfig,
) -> Backbones:
    """The feature network(s) of ``architecture`` (built and cached in ``model_dir``; ``--train_top``)."""
    models = load_backbones(
        architecture, model_dir, storage_options, training.block_features, training.train_top
    )
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


def exported_network(
    models: Backbones,
    quantize: bool,
    model_dir: str,
    storage_options: Mapping[str, Any] | None,
    block_features: bool,
) -> Backbones:
    """The network(s) ``--output_graph`` carries: ``models``, or with ``--quantize_output_graph`` their
    int8 versions (built and cached now, before the long stages).

    Raises:
        UsageError: ``--quantize_output_graph`` with a user model (only zoo networks have int8 versions).
    """
    if not quantize:
        return models
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
        int8.append(load_feature_model(name + INT8_SUFFIX, model_dir, storage_options, block_features))
    network = Backbones(tuple(int8))
    log.info("The output graph will carry %s", network.architecture)
    return network


def scan_images(
    image_dir: str, training: TrainingConfig, storage_options: Mapping[str, Any] | None
) -> ImageSet:
    """The images of ``image_dir``, their labels (class folders, or ``--labels_file``) and splits."""
    images = image_set(image_dir, training, storage_options)
    log.info(
        "Found %d images in %d classes: %s", len(images.files), len(images.labels), ", ".join(images.labels)
    )
    return images


def _shard_result(config: EngineConfig, model: Backbones, bottlenecks: Bottlenecks) -> ShardResult:
    log.info(
        "Worker %d of %d: its shard of the bottlenecks is cached; worker 0 trains",
        config.worker_index,
        config.worker_count,
    )
    cache = {"computed": bottlenecks.computed, "reused": bottlenecks.reused}
    return ShardResult(config.worker_index, config.worker_count, model.architecture, cache)
