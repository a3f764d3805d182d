"""The Spark engine: feature extraction on Spark executors, for collections beyond one machine.

The driver (this process) keeps the cache bookkeeping; Spark runs one job per *wave* of images:

* **Reading.** Each wave's files go to Spark's ``binaryFile`` source, so the executors read the bytes
  through Hadoop's own FileSystem: ``hdfs://`` with the Kerberos credentials and delegation tokens Spark
  manages (``spark.kerberos.principal`` / ``keytab``), with HDFS data locality; local paths; object
  stores. Spark's file sources never return empty files or names that start with ``_`` or ``.``:
  those, and files gone since the scan, go to a second job whose tasks read their own bytes through
  :mod:`lastlayer.storage`, so they are reported exactly as by the local engine.
* **The model** is broadcast once: Spark ships a broadcast to each executor once, and each Python
  worker builds its onnxruntime session on first use and keeps it for its next tasks.
* **Per image**, a partition runs the local engine's :func:`~lastlayer.engines.local.prepare` and
  :func:`~lastlayer.engines.local.run_network`: the same hashing, decoding, preprocessing, distorted
  variants and network, hence the same features.
* **Results** are collected by the driver and written through the same
  :class:`~lastlayer.cache.FeatureStore` as the local engine's. Spark returns the output of exactly one
  successful attempt of each partition, so a retried (or speculative) task never adds rows twice, and
  rows are keyed by content anyway. Each finished wave goes to the store, which writes a part file per
  4,096 rows or minute of work (and all it holds when the run fails): a killed job loses little more
  than the wave in flight.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from lastlayer import storage
from lastlayer.engines.base import NeedFn, Result, Task
from lastlayer.engines.local import Prepared, default_threads, prepare, read_task, run_network
from lastlayer.errors import EngineError, UsageError
from lastlayer.preprocess import NO_DISTORTIONS, Distortions
from lastlayer.zoo import FeatureModel

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.rdd import RDD
    from pyspark.sql import Row, SparkSession

    from lastlayer.hadoop import HadoopLogin

log = logging.getLogger(__name__)

INSTALL = "pip install 'lastlayer[spark]'"
#: Images of one Spark job: at least this many, and :data:`WAVE_PER_CORE` per core of the cluster.
WAVE_MIN = 4096
WAVE_PER_CORE = 64
#: Partitions of a wave per core (load balance), each of at least :data:`MIN_TASK_IMAGES` images.
PARTITIONS_PER_CORE = 2
MIN_TASK_IMAGES = 16
#: URL schemes Spark reads through a Hadoop FileSystem (a plain path is a local file).
HADOOP_SCHEMES = frozenset(
    {"file", "hdfs", "viewfs", "webhdfs", "swebhdfs", "s3a", "gs", "abfs", "abfss", "wasb", "wasbs", "ofs"}
)
_SCHEME_AND_HOST = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//[^/]*)?")
_GLOB_CHARS = re.compile(r"([\\{}\[\]*?])")

# One onnxruntime session per model in each Python worker, kept between tasks (workers are reused).
_sessions: dict[str, ort.InferenceSession] = {}


def available() -> bool:
    """Whether pyspark can be imported."""
    return importlib.util.find_spec("pyspark") is not None


def require() -> None:
    """Raise a one-line :class:`UsageError` saying how to install pyspark when it is missing."""
    if not available():
        raise UsageError(f"--engine=spark needs pyspark, which is not installed: {INSTALL} (and Java 17+)")


# -- the session ------------------------------------------------------------------------------
def configured_master() -> str | None:
    """``spark.master`` from Spark's own configuration (``spark-defaults.conf`` in ``SPARK_CONF_DIR``,
    else in ``$SPARK_HOME/conf``), or the ``MASTER`` environment variable, if set."""
    folder = os.environ.get("SPARK_CONF_DIR")
    if not folder and os.environ.get("SPARK_HOME"):
        folder = os.path.join(os.environ["SPARK_HOME"], "conf")
    if folder:
        try:
            lines = Path(folder, "spark-defaults.conf").read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines:
            key, _, value = line.strip().partition(" ")
            if key == "spark.master" and value.strip():
                return value.strip()
    return os.environ.get("MASTER") or None


def resolve_master(master: str = "") -> str:
    """The master to use: ``master``, else Spark's configuration, else ``local[N]`` with N = cores."""
    return master or configured_master() or f"local[{default_threads()}]"


def settings(master: str, hadoop: HadoopLogin | None = None) -> dict[str, str]:
    """The settings lastlayer gives a Spark session it starts for ``master``.

    Local masters listen on 127.0.0.1 only, without the web UI. With a login, its
    :meth:`~lastlayer.hadoop.HadoopLogin.spark_conf`: with a keytab (``--principal`` / ``--keytab``)
    Spark logs in from the same keytab (``spark.kerberos.principal`` / ``keytab``), the JVMs use the
    same ``krb5.conf``, and Hadoop's client configuration goes in as ``spark.hadoop.*``.
    """
    conf = {"spark.master": master, "spark.app.name": "lastlayer", "spark.ui.showConsoleProgress": "false"}
    if master.startswith("local"):
        conf.update(
            {
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.ui.enabled": "false",
                # the driver is the executor: list the wave's files in place, not in a Spark job
                "spark.sql.sources.parallelPartitionDiscovery.threshold": str(2**31 - 1),
            }
        )
    if hadoop is not None:
        conf.update(hadoop.spark_conf())
    return conf


def start(master: str = "", hadoop: HadoopLogin | None = None) -> SparkSession:
    """Start a Spark session with :func:`settings` for :func:`resolve_master`'s master and ``hadoop``.

    Raises:
        EngineError: Spark could not start (no Java, a bad master, ...), in one line.
    """
    require()
    from pyspark.sql import SparkSession

    logging.getLogger("py4j").setLevel(logging.WARNING)  # py4j logs every connection at INFO
    chosen = resolve_master(master)
    if chosen.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors' Python is this one
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder
    for key, value in settings(chosen, hadoop).items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # pyspark raises its own exception types, Java's come through py4j
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise EngineError(
            f"Spark could not start with master {chosen}: {first} (check that Java 17+ is installed: "
            "java on PATH or JAVA_HOME)"
        ) from exc
    log.info(
        "Spark %s started: master %s, %d cores", spark.version, chosen, spark.sparkContext.defaultParallelism
    )
    if hadoop is not None and hadoop.principal:
        log.info("Spark reads the images as %s", hadoop_user(spark))
    return spark


@contextmanager
def session(master: str = "", hadoop: HadoopLogin | None = None) -> Iterator[SparkSession]:
    """The active Spark session (left running), or a new one from :func:`start`, stopped on exit."""
    require()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        if master and active.sparkContext.master != master:
            log.warning(
                "--spark_master=%s ignored: this process already runs Spark with master %s",
                master,
                active.sparkContext.master,
            )
        yield active
        return
    spark = start(master, hadoop)
    try:
        yield spark
    finally:
        spark.stop()


def hadoop_user(spark: SparkSession) -> str:
    """Who Spark's Hadoop client is logged in as, e.g. ``tensorflow@LOCAL (KERBEROS, keytab)``."""
    ugi = spark.sparkContext._jvm.org.apache.hadoop.security.UserGroupInformation.getCurrentUser()  # type: ignore[union-attr]
    source = ", keytab" if ugi.isFromKeytab() else ""
    return f"{ugi.getUserName()} ({ugi.getAuthenticationMethod().toString()}{source})"


# -- paths ------------------------------------------------------------------------------------
def hadoop_uri(url: str) -> str:
    """``url`` as a Hadoop path: a plain path becomes an absolute ``file:`` URI.

    Raises:
        UsageError: for a scheme no Hadoop FileSystem serves (``memory://``, ...).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if not scheme:
        return "file:" + os.path.abspath(url)
    if scheme not in HADOOP_SCHEMES:
        raise UsageError(
            f"--engine=spark reads images through Hadoop's file systems, which cannot read {url}: "
            f"use a local path or one of {', '.join(sorted(HADOOP_SCHEMES))}:// (or --engine=local)"
        )
    return "file:" + url[len("file://") :] if scheme == "file" else url


def path_key(uri: str) -> str:
    """The path part of a Hadoop URI (scheme and host dropped, repeated slashes merged): how a row of
    ``binaryFile`` (``hdfs://nn:8020/a/b.jpg``) finds its task (``hdfs:///a/b.jpg``)."""
    return re.sub("/+", "/", _SCHEME_AND_HOST.sub("", uri, count=1))


def hidden_from_spark(uri: str) -> bool:
    """Whether Spark's file listing skips this file (names starting with ``_`` or ``.``)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return (name.startswith("_") and "=" not in name) or name.startswith(".") or name.endswith("._COPYING_")


# -- what runs on the executors ---------------------------------------------------------------
def _session_for(model: FeatureModel, threads: int) -> ort.InferenceSession:
    key = f"{model.key}:{threads}"
    if key not in _sessions:
        _sessions[key] = model.session(threads)
    return _sessions[key]


def _extract(
    items: Iterable[tuple[Task, bytes | None]],
    model_bc: Broadcast[FeatureModel],
    need_bc: Broadcast[NeedFn],
    distortions: Distortions,
    batch_size: int,
) -> Iterator[Result]:
    """Prepare each ``(task, bytes)`` and run the network, ``batch_size`` inputs at a time."""
    from pyspark import TaskContext

    context = TaskContext.get()
    model, need = model_bc.value, need_bc.value
    network = _session_for(model, int(context.cpus()) if context is not None else 1)
    chunk: list[Prepared] = []
    for task, data in items:
        chunk.append(prepare(task, data, need, model.preprocessing, distortions))
        if sum(len(p.inputs) for p in chunk) >= batch_size:
            yield from run_network(network, chunk, batch_size)
            chunk = []
    yield from run_network(network, chunk, batch_size)


def _extract_rows(
    rows: Iterable[Row], tasks_bc: Broadcast[dict[str, Task]], **kwargs: Any
) -> Iterator[Result]:
    """A partition of ``binaryFile`` rows (``path``, ``content``)."""
    tasks = tasks_bc.value
    return _extract(((tasks[path_key(r.path)], bytes(r.content)) for r in rows), **kwargs)


def _extract_tasks(
    tasks: Iterable[Task], storage_options: Mapping[str, Any] | None, **kwargs: Any
) -> Iterator[Result]:
    """A partition of tasks that read their own bytes (what Spark's listing does not return)."""
    return _extract(((t, read_task(t, storage_options)) for t in tasks), **kwargs)


# -- the driver -------------------------------------------------------------------------------
def _listed_by_spark(
    spark: SparkSession, wave: list[Task], tasks_bc: Broadcast[dict[str, Task]], **kwargs: Any
) -> RDD[Result]:
    frame = (
        spark.read.format("binaryFile")
        .option("ignoreMissingFiles", "true")
        .load([_GLOB_CHARS.sub(r"\\\1", hadoop_uri(t.url)) for t in wave])
        .select("path", "content")
    )
    # few, large partitions: a Python task costs tens of ms before it does anything
    slices = min(len(wave) // MIN_TASK_IMAGES, PARTITIONS_PER_CORE * spark.sparkContext.defaultParallelism)
    return frame.coalesce(max(1, slices)).rdd.mapPartitions(
        functools.partial(_extract_rows, tasks_bc=tasks_bc, **kwargs)
    )


def _collect(rdd: RDD[Result]) -> list[Result]:
    try:
        return rdd.collect()
    except Exception as exc:  # py4j / pyspark errors: a stage failed after Spark's retries
        raise EngineError(f"the Spark job failed: {_reason(exc)}") from exc


def _run_wave(
    spark: SparkSession, wave: list[Task], storage_options: Mapping[str, Any] | None, **kwargs: Any
) -> list[Result]:
    """One Spark job over the ``binaryFile`` rows of ``wave``, then one over the tasks it did not
    return (names Spark hides, empty files, files gone since the scan), which read their own bytes."""
    from pyspark.errors import AnalysisException

    sc = spark.sparkContext
    listed = [t for t in wave if not hidden_from_spark(hadoop_uri(t.url))]
    results: list[Result] = []
    while listed:
        tasks_bc = sc.broadcast({path_key(hadoop_uri(t.url)): t for t in listed})
        try:
            results = _collect(_listed_by_spark(spark, listed, tasks_bc, **kwargs))
            break
        except AnalysisException as exc:  # a file vanished between the scan and Spark's listing
            gone = [t for t in listed if not storage.exists(t.url, storage_options)]
            if not gone:
                raise EngineError(f"Spark cannot read the images: {str(exc).splitlines()[0]}") from exc
            listed = [t for t in listed if t not in gone]
        finally:
            tasks_bc.destroy()
    seen = {r.task.index for r in results}
    rest = [t for t in wave if t.index not in seen]
    if rest:
        own = sc.parallelize(rest, min(len(rest), sc.defaultParallelism)).mapPartitions(
            functools.partial(_extract_tasks, storage_options=storage_options, **kwargs)
        )
        results += _collect(own)
    return results


def _reason(exc: BaseException) -> str:
    """The most telling line of a Spark failure (the Python exception of a failed task, if any)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    python = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln) and "py4j" not in ln]
    return (python[-1] if python else lines[0] if lines else exc.__class__.__name__)[:500]


def extract(
    tasks: Iterable[Task],
    model: FeatureModel,
    need: NeedFn,
    *,
    distortions: Distortions = NO_DISTORTIONS,
    batch_size: int = 4,
    master: str = "",
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Result]:
    """Compute what ``need`` asks for, for each task, on Spark; yield one :class:`Result` per task.

    ``need`` must be picklable (it runs on the executors). Uses the active Spark session, or starts
    one for ``master`` (see :func:`resolve_master`) and stops it at the end.

    Args:
        progress: called with the number of tasks finished so far (after each wave).

    Raises:
        UsageError: an image URL no Hadoop FileSystem reads, or pyspark is missing.
        EngineError: Spark could not start, or a stage failed after Spark's retries.
    """
    todo = list(tasks)
    if todo:
        hadoop_uri(todo[0].url)  # a scheme Spark cannot read is refused before Spark starts
    with session(master) as spark:
        sc = spark.sparkContext
        model_bc, need_bc = sc.broadcast(model), sc.broadcast(need)
        wave_size = max(WAVE_MIN, WAVE_PER_CORE * sc.defaultParallelism)
        done = 0
        try:
            it = iter(todo)
            while wave := list(itertools.islice(it, wave_size)):
                yield from _run_wave(
                    spark,
                    wave,
                    storage_options,
                    model_bc=model_bc,
                    need_bc=need_bc,
                    distortions=distortions,
                    batch_size=batch_size,
                )
                done += len(wave)
                if progress is not None:
                    progress(done)
        finally:
            model_bc.destroy()
            need_bc.destroy()
