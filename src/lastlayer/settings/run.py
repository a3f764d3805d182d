"""The settings of a retraining run, as small typed config objects: training, cache, outputs, engine.

Each field is declared once (:func:`lastlayer.settings.fields.option`): its name is retrain.py's flag
name, its default is retrain.py's default, its help is the flag's ``--help`` and its limits are checked
when an object is made (:class:`~lastlayer.settings.fields.Checked`), as are the rules between fields.
The command line builds its flags from these classes; the Python API takes them as they are::

    lastlayer.retrain("flower_photos", training=TrainingConfig(how_many_training_steps=500))
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lastlayer.preprocess import Distortions
from lastlayer.settings import fields
from lastlayer.settings.fields import option

_BATCH = "must be -1 (all) or at least 1"
_AT_LEAST_1 = "must be at least 1"

#: Where networks run: the ``--device`` values.
CPU, CUDA, AUTO = "cpu", "cuda", "auto"
DEVICES = (CPU, CUDA, AUTO)
#: ``--engine`` name to the class that implements it, ``module:class``, imported only when a run makes
#: that engine (as fsspec's ``known_implementations``): settings load neither onnxruntime nor Spark.
KNOWN_ENGINES: dict[str, str] = {
    "local": "lastlayer.engines.local:LocalEngine",
    "spark": "lastlayer.engines.spark:SparkEngine",
}
ENGINE_NAMES = tuple(KNOWN_ENGINES)


@dataclass(frozen=True)
class TrainingConfig(fields.Checked):
    """How the last layer is trained and evaluated (retrain.py's training flags)."""

    how_many_training_steps: int = option(
        4000, "How many training steps to run before ending.", minimum=1, rule=_AT_LEAST_1
    )
    learning_rate: float = option(
        0.01, "How large a learning rate to use when training.", above=0, rule="must be positive"
    )
    testing_percentage: float = option(
        10,
        "What percentage of images to use as a test set.",
        minimum=0,
        below=100,
        rule="must be in [0, 100)",
    )
    validation_percentage: float = option(
        10,
        "What percentage of images to use as a validation set.",
        minimum=0,
        below=100,
        rule="must be in [0, 100)",
    )
    labels_file: str = option(
        "",
        "A table of the images' labels instead of class folders: CSV with a header, or JSON lines, with "
        "columns path (relative to --image_dir, or a URL under it), label, and optionally split "
        "(training, validation or testing) and group (its images share one split); local or a URL.",
    )
    multi_label: bool = option(
        False,
        "Several labels per image (a labels file's labels column, ';'-separated or a JSON list): one "
        "sigmoid per label, per-label thresholds chosen on the validation split, mAP and F1 scores.",
    )
    bad_label_rows: str = option(
        "skip",
        "What to do with --labels_file rows that name no image, no label or an unknown split: skip "
        "them with a warning, or refuse the file.",
        choices=("skip", "refuse"),
        upper_choices=False,
    )
    eval_step_interval: int = option(
        10, "How often (in steps) to evaluate the training results.", minimum=1, rule=_AT_LEAST_1
    )
    train_batch_size: int = option(
        100, "How many images to train on at a time (-1: all).", minimum=1, special=(-1,), rule=_BATCH
    )
    test_batch_size: int = option(
        -1,
        "How many test images to use for the final accuracy (-1: all).",
        minimum=1,
        special=(-1,),
        rule=_BATCH,
    )
    validation_batch_size: int = option(
        100, "How many images in a validation batch (-1: all).", minimum=1, special=(-1,), rule=_BATCH
    )
    balance_classes: bool = option(
        False,
        "Draw training images class-uniformly (retrain.py's way: rare classes weigh as much as common "
        "ones) instead of uniformly over the images (accuracy on the data's own class mix).",
    )
    cross_validation: int = option(
        0,
        "Also refit the last layer on this many folds of the cached features (no network pass) and log "
        "the mean and spread of accuracy, balanced accuracy and macro-F1; 0: off.",
        minimum=2,
        special=(0,),
        rule="must be 0 (off) or at least 2",
    )
    block_features: bool = option(
        True,
        "Add each block group's average-pooled output to the features of the shipped networks (the "
        "same network pass; +0.8 to +1.4 points by cross-validation on three data sets); "
        "--block_features=false for the last block's features alone.",
    )
    train_top: str = option(
        "none",
        "head: also train the network's head convolution (1x1, 320->1280, from its ImageNet weights) with "
        "the last layer, in numpy on cached activations (a cache of its own: about 32 KB per image, the "
        "features' 8 KB), then fit the last layer on its features; the model carries the trained head. "
        "About 8 GFLOP per step of 100 images: minutes for 500 steps on 2 cores (docs/benchmarks.md). One "
        "float zoo network; not with --cross_validation, --multi_label or --quantize_output_graph.",
        choices=("none", "head"),
        upper_choices=False,
    )
    flip_left_right: bool = option(False, "Randomly flip half of the training images horizontally.")
    random_crop: float = option(
        0,
        "Percentage margin to randomly crop off the training images.",
        minimum=0,
        rule="must be a percentage >= 0",
    )
    random_scale: float = option(
        0,
        "Percentage to randomly scale up the training images by.",
        minimum=0,
        rule="must be a percentage >= 0",
    )
    random_brightness: float = option(
        0,
        "Percentage to randomly multiply the training pixels up or down by.",
        minimum=0,
        below=100,
        rule="must be a percentage in [0, 100)",
    )
    random_seed: int | None = option(
        None, "Seed for the split-independent randomness; a run with a seed is reproducible."
    )
    # the trust stage (lastlayer.trust), on the cached features
    calibrate: bool = option(
        True,
        "Fit a temperature on held-out predictions (the validation split, or --cross_validation's folds) "
        "and fold it into the exported last layer, so its probabilities match how often it is right.",
    )
    unknown_recall: float = option(
        95.0,
        "Give the exported model a second output, a distance to the training classes, and call an image "
        "--unknown_label above the distance that keeps this percentage of the validation images; 0: off.",
        minimum=50,
        maximum=100,
        special=(0, 0.0),
        rule="must be 0 (off) or a percentage in [50, 100]",
    )
    unknown_label: str = option(
        "unknown", "What lastlayer label and serve say of an image above the --unknown_recall distance."
    )
    find_label_issues: bool = option(
        True,
        "List the images whose label out-of-fold probabilities (--cross_validation folds, else 5, on the "
        "cached features) most confidently dispute, as many as confident learning estimates are wrong.",
    )
    find_duplicates: bool = option(
        True,
        "List the groups of near-duplicate images (features at cosine >= 0.94): the same photo in training "
        "and in a held-out split (a leak) or under two classes (a conflict).",
    )

    @property
    def distortions(self) -> Distortions:
        """The distortion flags as one spec."""
        return Distortions(self.flip_left_right, self.random_crop, self.random_scale, self.random_brightness)

    def cross_problems(self) -> Iterator[tuple[str, Any, str]]:
        """The testing and validation shares leave training images; "unknown" has a word."""
        if self.testing_percentage + self.validation_percentage >= 100:
            yield (
                "testing_percentage",
                self.testing_percentage,
                f"with --validation_percentage={self.validation_percentage} leaves no training images",
            )
        if not self.unknown_label.strip():
            yield "unknown_label", self.unknown_label, "must not be empty"
        if self.train_top != "none" and (self.cross_validation or self.multi_label):
            yield (
                "train_top",
                self.train_top,
                "trains the top once on the training split, single-label: leave out --cross_validation "
                "and --multi_label (benchmarks/bench_quality.py accuracy --train_top head cross-validates)",
            )
        if self.multi_label and self.cross_validation:
            yield (
                "cross_validation",
                self.cross_validation,
                "is single-label: leave it out with --multi_label (benchmarks/bench_labels.py multi "
                "cross-validates multi-label runs)",
            )


@dataclass(frozen=True)
class CacheConfig(fields.Checked):
    """Where built networks and bottlenecks are kept."""

    model_dir: str = option("/tmp/imagenet", "Where the built ONNX networks are cached.")
    bottleneck_dir: str = option("/tmp/bottleneck", "Where the bottleneck cache (Parquet files) is kept.")
    distorted_variants: int = option(
        5,
        "With distortions on: distorted variants cached at most per training image (only as many as "
        "training draws the image), sampled while training.",
        minimum=1,
        rule=_AT_LEAST_1,
    )


@dataclass(frozen=True)
class OutputConfig(fields.Checked):
    """What a run writes and where."""

    output_graph: str = option("/tmp/output_graph.onnx", "Where to save the retrained model (one ONNX file).")
    output_labels: str = option("/tmp/output_labels.txt", "Where to save the labels, one a line.")
    summaries_dir: str = option(
        "/tmp/retrain_logs", "Where to write TensorBoard summaries (train/ and validation/)."
    )
    summary_json: str = option(
        "", "Where to write the JSON run summary (default: next to --output_graph, as <name>.summary.json)."
    )
    intermediate_output_graphs_dir: str = option(
        "/tmp/intermediate_graph/", "Where to save the intermediate models."
    )
    intermediate_store_frequency: int = option(
        0,
        "Save an intermediate model every this many steps; 0 saves none.",
        minimum=0,
        rule="must be 0 (off) or more",
    )
    final_tensor_name: str = option("final_result", "Name of the output of the retrained model.")
    unknown_output: str = option(
        "ood_score", "Name of the model's second output, its distance to the classes (--unknown_recall)."
    )
    quantize_output_graph: bool = option(
        False,
        "Write --output_graph with the int8 version of the network (a zoo network's <name>_int8: about "
        "a third of the size, for small devices); training still uses --architecture's features.",
    )
    print_misclassified_test_images: bool = option(False, "Log every misclassified test image.")
    report: bool = option(
        True,
        "Write an HTML report of the run next to --output_graph, as <name>.report.html (one file to open "
        "in a browser: data set, learning curves, confusion matrix, mistakes); needs lastlayer[report].",
    )

    @property
    def summary_url(self) -> str:
        """Where the run summary goes: ``summary_json``, else ``<output_graph stem>.summary.json``."""
        return self.summary_json or posixpath.splitext(self.output_graph)[0] + ".summary.json"

    @property
    def report_url(self) -> str:
        """Where the HTML report goes: ``<output_graph stem>.report.html``."""
        return posixpath.splitext(self.output_graph)[0] + ".report.html"

    def cross_problems(self) -> Iterator[tuple[str, Any, str]]:
        """The final tensor and the "unknown" score have names of their own."""
        if not self.final_tensor_name:
            yield "final_tensor_name", self.final_tensor_name, "must not be empty"
        if self.unknown_output in ("", self.final_tensor_name):
            yield "unknown_output", self.unknown_output, "must be a name, not empty nor --final_tensor_name"


@dataclass(frozen=True)
class EngineConfig(fields.Checked):
    """Where and how bottlenecks are computed."""

    engine: str = option(
        "local",
        "Where bottlenecks are computed: local (threads in this process) or spark (Spark executors; "
        "needs pip install 'lastlayer[spark]'). Both share the same cache.",
        choices=ENGINE_NAMES,
        upper_choices=False,
        rule=f"must be one of {', '.join(ENGINE_NAMES)}",
    )
    spark_master: str = option(
        "",
        "With --engine=spark: the Spark master (local[N], yarn, k8s://..., spark://...); default: Spark's "
        "own configuration (spark-defaults.conf, MASTER), else local[N] with N = cores.",
    )
    batch_size: int = option(
        4, "Images per network call when computing bottlenecks.", minimum=1, rule=_AT_LEAST_1
    )
    num_threads: int = option(
        0,
        "Threads for decoding and for the network; 0 = one per core.",
        minimum=0,
        rule="must be 0 (one per core) or more",
    )
    device: str = option(
        CPU,
        "Where the network runs: cpu, cuda (onnxruntime's CUDA execution provider; needs pip install "
        "'lastlayer[gpu]' and an NVIDIA GPU) or auto (cuda when a GPU answers, else cpu, with a log line).",
        choices=DEVICES,
        upper_choices=False,
    )
    gpu_batch_size: int = option(
        64,
        "With the network on a GPU: images per network call (the CPU cores decode, the GPU runs batches).",
        minimum=1,
        rule=_AT_LEAST_1,
    )
    worker_index: int = option(
        0, "This worker's index when --worker_count workers share the bottleneck work."
    )
    worker_count: int = option(
        1,
        "Workers sharing the bottleneck work: each computes its shard; worker 0 then trains on all.",
        minimum=1,
        rule=_AT_LEAST_1,
    )
    shard_wait_seconds: float = option(
        3600.0, "How long worker 0 waits for the other workers' shards.", above=0, rule="must be positive"
    )

    def cross_problems(self) -> Iterator[tuple[str, Any, str]]:
        """The worker is one of the workers; Spark runs on the CPU, with one driver."""
        if not 0 <= self.worker_index < self.worker_count:
            yield "worker_index", self.worker_index, "must be in [0, --worker_count)"
        if self.engine == "spark" and self.device != CPU:
            yield (
                "device",
                self.device,
                f"must be {CPU} with --engine=spark: Spark runs the network on the executors' CPUs",
            )
        if self.engine == "spark" and self.worker_count != 1:
            yield (
                "worker_count",
                self.worker_count,
                "must be 1 with --engine=spark: Spark spreads the work over its executors",
            )


def flat(config: Any) -> dict[str, Any]:
    """A config object's fields as ``{flag name: value}``."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
