"""The command-line flags of ``lastlayer``, each declared once.

A dataclass field (:func:`lastlayer.settings.fields.option`) is the single source of a flag's name, type,
default, help and limits. ``retrain``'s flags are retrain.py's (the codelab and TF-Hub versions) plus
lastlayer's own; most live in the config objects of :mod:`lastlayer.settings.run` (sections of
:class:`RetrainOptions`, flattened into flags). :func:`parse_flags` turns an argv list into validated
options. Unknown flags are refused with the closest valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar, get_type_hints

from lastlayer.errors import UsageError
from lastlayer.preprocess import MAX_PIXELS
from lastlayer.settings import fields as options
from lastlayer.settings.fields import LOG_LEVELS, option
from lastlayer.settings.run import CacheConfig, EngineConfig, OutputConfig, TrainingConfig
from lastlayer.zoo import DEFAULT_ARCHITECTURE

#: The logger name its lines always had (``lastlayer.options``), whatever the module's name.
log = logging.getLogger("lastlayer.options")


@dataclass
class RetrainOptions:
    """Everything ``lastlayer retrain`` takes. Paths are local paths or fsspec URLs (``hdfs://``, ...)."""

    image_dir: str = option("", "Folder of class sub-folders of images (default: the bundled demo set).")
    architecture: str = option(
        DEFAULT_ARCHITECTURE,
        "Network: mobilenet_v2_1.0_<224|192|160|128>, efficientnet_lite<0|1|2> (each also as <name>_int8, "
        "its int8 version), a codelab name "
        "(mobilenet_<1.0|0.75|0.50|0.25>_<size>, inception_v3: substituted, with a warning), "
        "several of these joined by '+' (their features concatenated in one model), "
        "or the path or URL of your own ONNX feature extractor (see docs/custom-models.md).",
    )
    training: TrainingConfig = option(factory=TrainingConfig)
    cache: CacheConfig = option(factory=CacheConfig)
    outputs: OutputConfig = option(factory=OutputConfig)
    engine: EngineConfig = option(factory=EngineConfig)
    logging_verbosity: str = option(
        "INFO",
        "Log level: DEBUG, INFO, WARN, ERROR or FATAL.",
        choices=LOG_LEVELS,
        rule=f"must be one of {LOG_LEVELS}",
    )
    tfhub_module: str = option(
        "",
        "Not supported (TensorFlow Hub modules need TensorFlow).",
        unsupported="TensorFlow Hub modules cannot run without TensorFlow: use --architecture with a zoo "
        "name (e.g. mobilenet_v2_1.0_224, efficientnet_lite0) or the path/URL of an ONNX feature extractor",
        refused=True,
    )
    saved_model_dir: str = option(
        "",
        "Not supported: --output_graph is already a self-contained ONNX model.",
        unsupported="there is no TensorFlow SavedModel to write: --output_graph is a self-contained ONNX "
        "model; serve it with onnxruntime or `lastlayer label`",
    )
    checkpoint_path: str = option(
        "",
        "Not used: the bottleneck cache makes a re-run resume; see --intermediate_store_frequency.",
        unsupported="no checkpoints are kept: a re-run resumes from the bottleneck cache; "
        "use --intermediate_store_frequency for models saved during training",
    )

    def validate(self) -> None:
        """Check its own flags (its sections checked themselves when they were made); warn about flags
        that are accepted but not used.

        Raises:
            UsageError: naming the flag and what to do.
        """
        options.check(self)
        _unsupported(self)
        if self.engine.engine == "spark":
            from lastlayer.engines import spark

            spark.require()

    def cross_problems(self) -> Iterator[tuple[str, Any, str]]:
        """A labels file needs the folder its paths are relative to."""
        if self.training.labels_file and not self.image_dir:
            yield (
                "labels_file",
                self.training.labels_file,
                "needs --image_dir, the folder its paths are under",
            )

    @classmethod
    def parser(cls, prog: str = "retrain", description: str = "") -> argparse.ArgumentParser:
        """An argument parser with every retrain flag (for job adapters such as the walkthrough's)."""
        parser = new_parser(prog, description or cls.__doc__ or "")
        add_flags(parser, cls)
        return parser

    @classmethod
    def normalize(cls, argv: Sequence[str]) -> list[str]:
        """``argv`` with boolean flags in ``--flag=value`` form (see :func:`normalize_bools`)."""
        return normalize_bools(argv, cls)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> RetrainOptions:
        """The options of a namespace parsed by :meth:`parser`."""
        return from_namespace(ns, cls)

    def api_kwargs(self) -> dict[str, Any]:
        """The arguments of :func:`lastlayer.retrain` these flags stand for."""
        return {
            "image_dir": self.image_dir,
            "architecture": self.architecture,
            "training": self.training,
            "cache": self.cache,
            "outputs": self.outputs,
            "engine": self.engine,
        }

    def shard_kwargs(self) -> dict[str, Any]:
        """The arguments of :func:`lastlayer.extract_shard` (a worker other than 0) these flags stand for."""
        return {k: v for k, v in self.api_kwargs().items() if k != "outputs"}


def _unsupported(opts: Any) -> None:
    for f in fields(opts):
        meta = options.info(f)
        if meta.unsupported and getattr(opts, f.name):
            if meta.refused:
                raise UsageError(f"--{f.name}: {meta.unsupported}")
            log.warning("--%s is ignored: %s", f.name, meta.unsupported)


@dataclass
class LabelOptions:
    """Everything ``lastlayer label`` takes (label_image.py's flags)."""

    graph: str = option("/tmp/output_graph.onnx", "The retrained model (ONNX) to use.", nonempty=True)
    labels: str = option("", "Labels file, one a line (default: the labels stored in the model).")
    image: list[str] = option(
        factory=list,
        doc="An image to label (path or URL); repeat for more, or list them after the flags.",
        multiple=True,
        nonempty=True,
    )
    top_k: int = option(5, "How many labels to show per image.", minimum=1, rule="must be at least 1")
    num_threads: int = option(
        0, "Threads for the network; 0 = one per core.", minimum=0, rule="must be 0 (one per core) or more"
    )
    json: bool = option(False, "Print JSON lines instead of text.")
    input_height: int | None = option(None, "Ignored: the model carries its input size.")
    input_width: int | None = option(None, "Ignored: the model carries its input size.")
    input_mean: float | None = option(None, "Ignored: the model carries its preprocessing.")
    input_std: float | None = option(None, "Ignored: the model carries its preprocessing.")
    input_layer: str | None = option(None, "Ignored: the model's input is always 'image'.")
    output_layer: str | None = option(None, "Output to read (default: the model's final tensor).")

    def validate(self) -> None:
        """Check values; warn about the flags it ignores. Raises UsageError naming the flag."""
        options.check(self)
        for name in ("input_height", "input_width", "input_mean", "input_std", "input_layer"):
            if getattr(self, name) is not None:
                log.warning("--%s is ignored: the model carries its own preprocessing and input", name)


@dataclass
class ReportOptions:
    """What ``lastlayer report SUMMARY_JSON`` takes besides the summary file."""

    output: str = option(
        "",
        "Where to write the report (default: beside the summary file, <stem>.report.html for "
        "<stem>.summary.json); an existing file there must be a lastlayer report.",
    )
    fetch_images: bool = option(
        False,
        "Read thumbnails from an image folder on another filesystem than the report's (e.g. an "
        "http:// or remote URL the summary names); by default only local ones and those beside the report.",
    )

    def validate(self) -> None:
        """Nothing to check: any path or URL will do."""


@dataclass
class ServeOptions:
    """Everything ``lastlayer serve`` takes: the models, the address and the bounds on requests."""

    graph: list[str] = option(
        factory=list,
        doc="A retrained model to serve (path or URL); repeat for more. Its name in URLs is the file "
        "name without .onnx, or NAME in NAME=URL (default: /tmp/output_graph.onnx).",
        multiple=True,
        nonempty=True,
    )
    host: str = option(
        "127.0.0.1",
        "Address to listen on (0.0.0.0: every interface; there is no authentication).",
        nonempty=True,
    )
    port: int = option(8080, "Port to listen on (0: any free port).", minimum=0, maximum=65535)
    top_k: int = option(5, "Labels :classify returns unless the request asks (?top_k=N).", minimum=1)
    max_batch: int = option(32, "Most images per network call, gathered across requests.", minimum=1)
    max_wait_ms: float = option(
        10.0,
        "How long a batch waits, after its first image, for images still being decoded, ms (a lone "
        "request never waits).",
        minimum=0,
        maximum=10_000,
    )
    max_queue: int = option(
        256,
        "Most inference requests in progress, and most images waiting for the network (also in one "
        "request); beyond, 503.",
        minimum=1,
    )
    max_request_bytes: int = option(
        10 << 20,
        "Largest request body accepted, bytes; beyond, 413 (request bodies held at once: at most "
        "--max_queue of them).",
        minimum=1,
        metavar="BYTES",
    )
    max_pixels: int = option(
        40_000_000,
        "Largest image accepted, width x height in px; beyond, 400.",
        minimum=1,
        maximum=MAX_PIXELS,
        rule=f"must be in [1, {MAX_PIXELS}]",
    )
    max_decode_pixels: int = option(
        120_000_000,
        "Most pixels of images being decoded at once, across requests (bounds the server's memory: "
        "about 10 bytes a pixel); beyond, 503. At least --max_pixels.",
        minimum=1,
    )
    request_timeout: float = option(
        60.0, "Seconds a request may take to arrive and to be answered; beyond, 408 or 503.", above=0
    )
    header_timeout: float = option(
        5.0,
        "Seconds a connection may take to send a request's head (request line and headers); beyond, "
        "the connection is closed.",
        above=0,
        maximum=600,
    )
    max_connections: int = option(
        1000, "Most open connections; a request on one beyond gets 503.", minimum=1, maximum=100_000
    )
    allowed_host: list[str] = option(
        factory=list,
        doc="A host name (or address) clients may use in the Host header, besides --host, localhost, "
        "127.0.0.1 and ::1; repeat for more ('*': any; other names are refused against DNS rebinding).",
        multiple=True,
        nonempty=True,
    )
    num_threads: int = option(0, "onnxruntime threads per model; 0 = one per core.", minimum=0)
    access_log: bool = option(False, "Log every request (uvicorn's access log).")

    def validate(self) -> None:
        """Check values. Raises UsageError naming the flag."""
        options.check(self)

    def cross_problems(self) -> Iterator[tuple[str, Any, str]]:
        """The decode budget holds the largest image."""
        if self.max_decode_pixels < self.max_pixels:
            yield (
                "max_decode_pixels",
                self.max_decode_pixels,
                f"must be at least --max_pixels={self.max_pixels}, or no image that large could be decoded",
            )

    def graphs(self) -> list[str]:
        """The models to serve: ``--graph`` values, else retrain's default ``--output_graph``."""
        return self.graph or [OutputConfig().output_graph]


@dataclass
class UploadOptions:
    """What ``lastlayer upload`` takes besides its source and destination."""

    threads: int = option(
        0,
        "Files copied at once; 0 = as many as the destination's latency calls for (8, doubled while "
        "the rate of finished files keeps rising, up to 256).",
        minimum=0,
        rule="must be 0 (adapt) or more",
    )

    def validate(self) -> None:
        """Check values. Raises UsageError naming the flag."""
        options.check(self)


@dataclass
class AuthToLocalOptions:
    """Where ``lastlayer auth-to-local`` takes its rules from (one of the three) and how it applies them."""

    rules: str = option("", "The rules, as in hadoop.security.auth_to_local (newline or space separated).")
    rules_base64: str = option(
        "", "The rules, base64-encoded (as the walkthrough's hdfs.security_auth_to_local)."
    )
    core_site: str = option("", "A core-site.xml (path or URL) to read hadoop.security.auth_to_local from.")
    default_realm: str = option(
        "", "The default realm (default: krb5.conf's default_realm, else the principal's)."
    )
    mechanism: str = option(
        "hadoop",
        "hadoop (strict: simple names only) or mit.",
        choices=("hadoop", "mit"),
        upper_choices=False,
        rule="must be hadoop or mit",
    )

    def validate(self) -> None:
        """Exactly one source of rules; a known mechanism."""
        given = [name for name in ("rules", "rules_base64", "core_site") if getattr(self, name)]
        if len(given) != 1:
            raise UsageError("pass exactly one of --rules, --rules_base64 or --core_site")
        options.check(self)


@dataclass
class JobOptions:
    """Flags of ``lastlayer job ACTION``."""

    name: str = option("tensorflow", "The job's service.name (deploy takes it from the options file).")
    state_dir: str = option("", "Where jobs keep state (default: LASTLAYER_STATE_DIR, ~/.lastlayer/jobs).")
    detach: bool = option(
        False, "deploy / plan restart: return once the job runs; follow it with `plan show`."
    )
    timeout: float = option(
        0.0,
        "deploy / plan restart: stop the job this many seconds after the command started, downloads "
        "included (0: no limit).",
        minimum=0,
        finite=False,
        rule="must be 0 (no limit) or positive",
    )
    completed: bool = option(False, "log: read the log of a finished task.")
    scheduler: str = option(
        "local",
        "deploy: where the tasks run: local (processes here) or yarn (a YARN container each, via skein).",
        choices=("local", "yarn"),
        upper_choices=False,
    )
    yarn_env: str = option(
        "", "deploy --scheduler=yarn: URL of the tasks' packed Python (yarn_archives.py --job)."
    )
    root: str = option(
        "",
        "package: folder to put the job under inside the zip (e.g. the walkthrough's "
        "dcos-tensorflow-demos-master/poets minus the last part).",
    )
    secrets_dir: str = option(
        "", "The secret store (default: LASTLAYER_SECRETS_DIR or ~/.lastlayer/secrets)."
    )

    def validate(self) -> None:
        """Check values. Raises UsageError naming the flag."""
        options.check(self)


T = TypeVar("T")


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


def leaves(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    """Every flag of ``cls`` as ``(field, type)``: the fields of its sections (config objects) in
    place of the sections."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if options.is_section(hints[f.name]):
            yield from leaves(hints[f.name])
        else:
            yield f, hints[f.name]


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of ``cls`` (sections flattened) to ``parser``."""
    for f, hint in leaves(cls):
        meta = options.info(f)
        default = options.default(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta.doc}
        if meta.multiple:
            kwargs.update(action="append", metavar="URL")
        elif hint is bool:
            kwargs.update(type=parse_bool, metavar="BOOL")
        else:
            base = next(t for t in (int, float, str) if t in getattr(hint, "__args__", (hint,)))
            kwargs["type"] = _optional(base) if default is None else base
            kwargs["metavar"] = meta.metavar or base.__name__.upper()
        if default not in (None, "", False) and not meta.multiple:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(f"--{f.name}", **kwargs)
        parser.set_defaults(**{f.name: default})


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser that raises :class:`UsageError` and never guesses abbreviations."""
    return _Parser(prog=prog, description=description, allow_abbrev=False)


_BOOL_WORDS = frozenset({"1", "0", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"})


def normalize_bools(argv: Sequence[str], *classes: type) -> list[str]:
    """Rewrite boolean flags to ``--flag=value``: a bare ``--flag`` means true, and ``--flag True``
    (the walkthrough's key/value pairs) is read as one flag, so a bare flag never swallows an argument."""
    flags = {f"--{f.name}" for cls in classes for f, hint in leaves(cls) if hint is bool}
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
            close = options.closest(name, [f.name for cls in classes for f, _ in leaves(cls)])
            hint = f"; did you mean --{close}?" if close else "; see --help for the flags"
            raise UsageError(f"unknown flag --{name}{hint}")
    if unknown:
        raise UsageError(f"unexpected argument {unknown[0]!r} (flags take the form --name=value; see --help)")


def from_namespace(ns: argparse.Namespace, cls: type[T]) -> T:
    """Build ``cls`` (and its sections) from parsed flags."""
    hints = get_type_hints(cls)
    values = {
        f.name: from_namespace(ns, hints[f.name])
        if options.is_section(hints[f.name])
        else getattr(ns, f.name)
        for f in fields(cls)  # type: ignore[arg-type]
    }
    return cls(**values)


def checked(ns: argparse.Namespace, cls: type[T]) -> T:
    """The options ``cls`` of parsed flags, built (its sections check themselves) and checked
    (its ``validate()``): the one way the command line makes typed options.

    Raises:
        UsageError: naming the flag and what to do.
    """
    opts = from_namespace(ns, cls)
    opts.validate()  # type: ignore[attr-defined]
    return opts


def parse_flags(argv: Sequence[str], cls: type[T] = RetrainOptions) -> T:  # type: ignore[assignment]
    """Parse retrain.py-style flags (``--name=value`` or ``--name value``) into validated options."""
    parser = new_parser(cls.__name__, cls.__doc__ or "")
    add_flags(parser, cls)
    ns, unknown = parser.parse_known_args(normalize_bools(argv, cls))
    reject_unknown(unknown, cls)
    return checked(ns, cls)
