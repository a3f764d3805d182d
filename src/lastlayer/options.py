"""Options of the ``lastlayer`` commands, each declared once.

A dataclass field is the single source of a flag's name, type, default and help. The flags are
retrain.py's (the codelab and TF-Hub versions) plus lastlayer's own; :func:`parse_flags` turns an
argv list into options and :meth:`RetrainOptions.validate` checks them, naming the flag in every
message. Unknown flags are refused with the closest valid one.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar, get_type_hints

from lastlayer.errors import UsageError
from lastlayer.fields import info
from lastlayer.preprocess import Distortions
from lastlayer.zoo import DEFAULT_ARCHITECTURE

log = logging.getLogger(__name__)

#: The engines of ``--engine`` (:mod:`lastlayer.features` runs them).
ENGINES = ("local", "spark")
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL")


def _opt(default: Any, help: str, *, metavar: str | None = None, unsupported: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar, "unsupported": unsupported})


@dataclass
class RetrainOptions:
    """Everything ``lastlayer retrain`` takes. Paths are local paths or fsspec URLs (``hdfs://``, ...)."""

    image_dir: str = _opt("", "Folder of class sub-folders of images (default: the bundled demo set).")
    output_graph: str = _opt("/tmp/output_graph.onnx", "Where to save the retrained model (one ONNX file).")
    intermediate_output_graphs_dir: str = _opt(
        "/tmp/intermediate_graph/", "Where to save the intermediate models."
    )
    intermediate_store_frequency: int = _opt(
        0, "Save an intermediate model every this many steps; 0 saves none."
    )
    output_labels: str = _opt("/tmp/output_labels.txt", "Where to save the labels, one a line.")
    summaries_dir: str = _opt(
        "/tmp/retrain_logs", "Where to write TensorBoard summaries (train/ and validation/)."
    )
    summary_json: str = _opt(
        "", "Where to write the JSON run summary (default: next to --output_graph, as <name>.summary.json)."
    )
    how_many_training_steps: int = _opt(4000, "How many training steps to run before ending.")
    learning_rate: float = _opt(0.01, "How large a learning rate to use when training.")
    testing_percentage: float = _opt(10, "What percentage of images to use as a test set.")
    validation_percentage: float = _opt(10, "What percentage of images to use as a validation set.")
    eval_step_interval: int = _opt(10, "How often (in steps) to evaluate the training results.")
    train_batch_size: int = _opt(100, "How many images to train on at a time (-1: all).")
    test_batch_size: int = _opt(-1, "How many test images to use for the final accuracy (-1: all).")
    validation_batch_size: int = _opt(100, "How many images in a validation batch (-1: all).")
    print_misclassified_test_images: bool = _opt(False, "Log every misclassified test image.")
    model_dir: str = _opt("/tmp/imagenet", "Where the built ONNX networks are cached.")
    bottleneck_dir: str = _opt("/tmp/bottleneck", "Where the bottleneck cache (Parquet files) is kept.")
    final_tensor_name: str = _opt("final_result", "Name of the output of the retrained model.")
    flip_left_right: bool = _opt(False, "Randomly flip half of the training images horizontally.")
    random_crop: float = _opt(0, "Percentage margin to randomly crop off the training images.")
    random_scale: float = _opt(0, "Percentage to randomly scale up the training images by.")
    random_brightness: float = _opt(0, "Percentage to randomly multiply the training pixels up or down by.")
    distorted_variants: int = _opt(
        5, "With distortions on: distorted variants cached per training image, sampled while training."
    )
    architecture: str = _opt(
        DEFAULT_ARCHITECTURE,
        "Network: mobilenet_v2_1.0_<224|192|160|128>, efficientnet_lite<0|1|2>, a codelab name "
        "(mobilenet_<1.0|0.75|0.50|0.25>_<size>, inception_v3: substituted, with a warning), "
        "or the path or URL of your own ONNX feature extractor (see docs/custom-models.md).",
    )
    random_seed: int | None = _opt(
        None, "Seed for the split-independent randomness; a run with a seed is reproducible."
    )
    batch_size: int = _opt(4, "Images per network call when computing bottlenecks.")
    num_threads: int = _opt(0, "Threads for decoding and for the network; 0 = one per core.")
    engine: str = _opt(
        "local",
        "Where bottlenecks are computed: local (threads in this process) or spark (Spark executors; "
        "needs pip install 'lastlayer[spark]'). Both share the same cache.",
    )
    spark_master: str = _opt(
        "",
        "With --engine=spark: the Spark master (local[N], yarn, k8s://..., spark://...); default: Spark's "
        "own configuration (spark-defaults.conf, MASTER), else local[N] with N = cores.",
    )
    logging_verbosity: str = _opt("INFO", "Log level: DEBUG, INFO, WARN, ERROR or FATAL.")
    worker_index: int = _opt(0, "This worker's index when --worker_count workers share the bottleneck work.")
    worker_count: int = _opt(
        1, "Workers sharing the bottleneck work: each computes its shard; worker 0 then trains on all."
    )
    shard_wait_seconds: float = _opt(3600.0, "How long worker 0 waits for the other workers' shards.")
    tfhub_module: str = _opt(
        "",
        "Not supported (TensorFlow Hub modules need TensorFlow).",
        unsupported="TensorFlow Hub modules cannot run without TensorFlow: use --architecture with a zoo "
        "name (e.g. mobilenet_v2_1.0_224, efficientnet_lite0) or the path/URL of an ONNX feature extractor",
    )
    saved_model_dir: str = _opt(
        "",
        "Not supported: --output_graph is already a self-contained ONNX model.",
        unsupported="there is no TensorFlow SavedModel to write: --output_graph is a self-contained ONNX "
        "model; serve it with onnxruntime or `lastlayer label`",
    )
    checkpoint_path: str = _opt(
        "",
        "Not used: the bottleneck cache makes a re-run resume; see --intermediate_store_frequency.",
        unsupported="no checkpoints are kept: a re-run resumes from the bottleneck cache; "
        "use --intermediate_store_frequency for models saved during training",
    )

    @property
    def distortions(self) -> Distortions:
        """The distortion flags as one spec."""
        return Distortions(self.flip_left_right, self.random_crop, self.random_scale, self.random_brightness)

    def validate(self) -> None:
        """Check values and their combinations.

        Raises:
            UsageError: naming the flag and what to do.
        """

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise UsageError(f"--{name}={getattr(self, name)!r}: {why}")

        need(self.how_many_training_steps >= 1, "how_many_training_steps", "must be at least 1")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        for name in ("testing_percentage", "validation_percentage"):
            need(0 <= getattr(self, name) < 100, name, "must be in [0, 100)")
        need(
            self.testing_percentage + self.validation_percentage < 100,
            "testing_percentage",
            f"with --validation_percentage={self.validation_percentage} leaves no training images",
        )
        need(self.eval_step_interval >= 1, "eval_step_interval", "must be at least 1")
        for name in ("train_batch_size", "test_batch_size", "validation_batch_size"):
            value = getattr(self, name)
            need(value == -1 or value >= 1, name, "must be -1 (all) or at least 1")
        need(
            self.intermediate_store_frequency >= 0, "intermediate_store_frequency", "must be 0 (off) or more"
        )
        for name in ("random_crop", "random_scale"):
            need(getattr(self, name) >= 0, name, "must be a percentage >= 0")
        need(0 <= self.random_brightness < 100, "random_brightness", "must be a percentage in [0, 100)")
        need(self.distorted_variants >= 1, "distorted_variants", "must be at least 1")
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.worker_count >= 1, "worker_count", "must be at least 1")
        need(0 <= self.worker_index < self.worker_count, "worker_index", "must be in [0, --worker_count)")
        need(self.shard_wait_seconds > 0, "shard_wait_seconds", "must be positive")
        need(self.num_threads >= 0, "num_threads", "must be 0 (one per core) or more")
        need(self.engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}")
        if self.engine == "spark":
            need(
                self.worker_count == 1,
                "worker_count",
                "must be 1 with --engine=spark: Spark spreads the work over its executors",
            )
            from lastlayer.engines import spark

            spark.require()
        need(
            self.logging_verbosity.upper() in LOG_LEVELS, "logging_verbosity", f"must be one of {LOG_LEVELS}"
        )
        need(bool(self.final_tensor_name), "final_tensor_name", "must not be empty")
        for f in fields(self):
            message = f.metadata.get("unsupported")
            if message and getattr(self, f.name):
                if f.name == "tfhub_module":
                    raise UsageError(f"--{f.name}: {message}")
                log.warning("--%s is ignored: %s", f.name, message)


@dataclass
class LabelOptions:
    """Everything ``lastlayer label`` takes (label_image.py's flags)."""

    graph: str = _opt("/tmp/output_graph.onnx", "The retrained model (ONNX) to use.")
    labels: str = _opt("", "Labels file, one a line (default: the labels stored in the model).")
    image: list[str] = field(
        default_factory=list,
        metadata={
            "help": "An image to label (path or URL); repeat for more, or list them after the flags.",
            "multiple": True,
        },
    )
    top_k: int = _opt(5, "How many labels to show per image.")
    num_threads: int = _opt(0, "Threads for the network; 0 = one per core.")
    json: bool = _opt(False, "Print JSON lines instead of text.")
    input_height: int | None = _opt(None, "Ignored: the model carries its input size.")
    input_width: int | None = _opt(None, "Ignored: the model carries its input size.")
    input_mean: float | None = _opt(None, "Ignored: the model carries its preprocessing.")
    input_std: float | None = _opt(None, "Ignored: the model carries its preprocessing.")
    input_layer: str | None = _opt(None, "Ignored: the model's input is always 'image'.")
    output_layer: str | None = _opt(None, "Output to read (default: the model's final tensor).")

    def validate(self) -> None:
        """Check values. Raises UsageError naming the flag."""
        if self.top_k < 1:
            raise UsageError(f"--top_k={self.top_k}: must be at least 1")
        if self.num_threads < 0:
            raise UsageError(f"--num_threads={self.num_threads}: must be 0 (one per core) or more")
        for name in ("input_height", "input_width", "input_mean", "input_std", "input_layer"):
            if getattr(self, name) is not None:
                log.warning("--%s is ignored: the model carries its own preprocessing and input", name)


@dataclass
class UploadOptions:
    """What ``lastlayer upload`` takes besides its source and destination."""

    threads: int = _opt(8, "Files copied at once.")

    def validate(self) -> None:
        """Check values. Raises UsageError naming the flag."""
        if self.threads < 1:
            raise UsageError(f"--threads={self.threads}: must be at least 1")


@dataclass
class AuthToLocalOptions:
    """Where ``lastlayer auth-to-local`` takes its rules from (one of the three) and how it applies them."""

    rules: str = _opt("", "The rules, as in hadoop.security.auth_to_local (newline or space separated).")
    rules_base64: str = _opt(
        "", "The rules, base64-encoded (as the walkthrough's hdfs.security_auth_to_local)."
    )
    core_site: str = _opt("", "A core-site.xml (path or URL) to read hadoop.security.auth_to_local from.")
    default_realm: str = _opt(
        "", "The default realm (default: krb5.conf's default_realm, else the principal's)."
    )
    mechanism: str = _opt("hadoop", "hadoop (strict: simple names only) or mit.")

    def validate(self) -> None:
        """Exactly one source of rules; a known mechanism."""
        given = [name for name in ("rules", "rules_base64", "core_site") if getattr(self, name)]
        if len(given) != 1:
            raise UsageError("pass exactly one of --rules, --rules_base64 or --core_site")
        if self.mechanism not in ("hadoop", "mit"):
            raise UsageError(f"--mechanism={self.mechanism!r}: must be hadoop or mit")


@dataclass
class JobOptions:
    """Flags of ``lastlayer job ACTION``."""

    name: str = _opt("tensorflow", "The job's service.name (deploy takes it from the options file).")
    state_dir: str = _opt("", "Where jobs keep state (default: LASTLAYER_STATE_DIR, ~/.lastlayer/jobs).")
    detach: bool = _opt(False, "deploy / plan restart: return once the job runs; follow it with `plan show`.")
    timeout: float = _opt(0.0, "deploy / plan restart: stop the tasks after this many seconds (0: no limit).")
    completed: bool = _opt(False, "log: read the log of a finished task.")
    root: str = _opt(
        "",
        "package: folder to put the job under inside the zip (e.g. the walkthrough's "
        "dcos-tensorflow-demos-master/poets minus the last part).",
    )
    secrets_dir: str = _opt("", "The secret store (default: LASTLAYER_SECRETS_DIR or ~/.lastlayer/secrets).")

    def validate(self) -> None:
        """Check values. Raises UsageError naming the flag."""
        if self.timeout < 0:
            raise UsageError(f"--timeout={self.timeout}: must be 0 (no limit) or positive")


T = TypeVar("T", RetrainOptions, LabelOptions, UploadOptions, AuthToLocalOptions, JobOptions)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of exiting."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see --help)")


def parse_bool(text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` in any case."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on", "t", "y"):
        return True
    if lowered in ("0", "false", "no", "off", "f", "n", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type) -> Any:
    def convert(text: str) -> Any:
        return None if text.lower() in ("", "none") else kind(text)

    convert.__name__ = kind.__name__
    return convert


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of ``cls`` to ``parser`` (fields of :func:`_opt` or
    :func:`lastlayer.fields.option`)."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not MISSING else None
        declared = info(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", declared.doc)}
        if f.metadata.get("multiple", declared.multiple):
            kwargs.update(action="append", metavar="URL")
        elif hint is bool:
            kwargs.update(type=parse_bool, metavar="BOOL")
        else:
            base = next(t for t in (int, float, str) if t in getattr(hint, "__args__", (hint,)))
            kwargs["type"] = _optional(base) if default is None else base
            kwargs["metavar"] = f.metadata.get("metavar") or declared.metavar or base.__name__.upper()
        if default not in (None, "", False) and not f.metadata.get("multiple", declared.multiple):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(f"--{f.name}", **kwargs)
    parser.set_defaults(
        **{
            f.name: (f.default if f.default is not MISSING else f.default_factory())  # type: ignore[misc]
            for f in fields(cls)
        }
    )


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser that raises :class:`UsageError` and never guesses abbreviations."""
    return _Parser(prog=prog, description=description, allow_abbrev=False)


_BOOL_WORDS = frozenset({"1", "0", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"})


def normalize_bools(argv: Sequence[str], *classes: type) -> list[str]:
    """Rewrite boolean flags to ``--flag=value``: a bare ``--flag`` means true, and ``--flag True``
    (the walkthrough's key/value pairs) is read as one flag, so a bare flag never swallows an argument."""
    flags = {f"--{f.name}" for cls in classes for f in fields(cls) if get_type_hints(cls)[f.name] is bool}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in flags:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if following is not None and following.strip().lower() in _BOOL_WORDS:
                out.append(f"{token}={following}")
                i += 2
                continue
            out.append(f"{token}=true")
        else:
            out.append(token)
        i += 1
    return out


def reject_unknown(unknown: Sequence[str], *classes: type) -> None:
    """Raise :class:`UsageError` for the first unknown flag, naming the closest valid one."""
    for token in unknown:
        if token.startswith("-"):
            name = token.lstrip("-").split("=", 1)[0]
            valid = [f.name for cls in classes for f in fields(cls)]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help for the flags"
            raise UsageError(f"unknown flag --{name}{hint}")
    if unknown:
        raise UsageError(f"unexpected argument {unknown[0]!r} (flags take the form --name=value; see --help)")


def from_namespace(ns: argparse.Namespace, cls: type[T]) -> T:
    """Build ``cls`` from parsed flags."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def parse_flags(argv: Sequence[str], cls: type[T] = RetrainOptions) -> T:  # type: ignore[assignment]
    """Parse retrain.py-style flags (``--name=value`` or ``--name value``) into validated options."""
    parser = new_parser(cls.__name__, cls.__doc__ or "")
    add_flags(parser, cls)
    ns, unknown = parser.parse_known_args(normalize_bools(argv, cls))
    reject_unknown(unknown, cls)
    opts = from_namespace(ns, cls)
    opts.validate()
    return opts
