"""The Spark engine: feature extraction on Spark executors, for collections beyond one machine.

The driver (this process) keeps the cache bookkeeping; Spark runs one job per *wave* of images, and
receives from it only what each image was found to be (content key, decode error) and the names of
the part files the tasks wrote:

* **Each task** (:func:`lastlayer.engines.executor.extract`) reads its images, decodes them and runs
  the network exactly as the local engine does
  (:func:`~lastlayer.engines.batch.read_task`, :func:`~lastlayer.engines.batch.prepare`,
  :func:`~lastlayer.engines.batch.run_network`: same hashing, decoding, preprocessing, distorted
  variants and network, hence the same features and the same skipped images), with a thread that
  reads and decodes the next images while the network runs (:func:`~lastlayer.engines.batch.prefetch`).
* **The model** is broadcast once (its bytes, name, key and preprocessing: a
  :class:`~lastlayer.engines.executor.Network`): Spark ships a broadcast to each executor once, and
  each Python worker builds its onnxruntime session on first use and keeps it for its next tasks.
* **The cache.** Each task writes its rows as part files into the staging folder of its wave
  (:func:`~lastlayer.bottlenecks.staging.stage_part`); when the wave's job has succeeded, the driver
  moves the files of the one successful attempt of each task into the cache folder and removes the
  staging folder with whatever failed, retried or speculative attempts left there
  (:func:`~lastlayer.bottlenecks.staging.commit`): no row is added twice, none is lost, and a killed
  run loses at most the wave in flight.
* **Storage** on the executors goes through :mod:`lastlayer.storage`, as on the driver. On a local
  master the executors are this machine and use the driver's login; on a cluster they use their own
  credentials: on a Kerberized HDFS the delegation tokens of ``HADOOP_TOKEN_FILE_LOCATION`` (which
  YARN gives every container of a Spark application that logs in with ``spark.kerberos.*``), with the
  Hadoop configuration of the login (``spark.hadoop.*``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lastlayer.engines import executor, jvm, shipping
from lastlayer.engines.base import Engine, NeedTest, Result, Task, available_cores
from lastlayer.engines.batch import chunks
from lastlayer.engines.executor import Network, Outcome
from lastlayer.errors import EngineError, UsageError
from lastlayer.preprocess import NO_DISTORTIONS, Distortions

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lastlayer.bottlenecks.staging import CacheFolders
    from lastlayer.settings.run import EngineConfig
    from lastlayer.zoo import FeatureModel

log = logging.getLogger(__name__)

INSTALL = "pip install 'lastlayer[spark]'"
#: Images of one Spark job: at least this many, and :data:`WAVE_PER_CORE` per core of the cluster.
WAVE_MIN = 4096
WAVE_PER_CORE = 2048
#: Partitions of a wave per core (load balance), each of at least :data:`MIN_TASK_IMAGES` images;
#: each task writes a part file per folder, so a wave of 2048 images per core writes about one file
#: per 1,000 images.
PARTITIONS_PER_CORE = 2
MIN_TASK_IMAGES = 64
#: Staging folders of runs older than this are removed when a run starts (a killed driver's).
STALE_STAGING_S = 7 * 24 * 3600.0
#: Storage options of the ``hdfs``/``viewfs`` groups that name the driver's own login and files.
DRIVER_LOGIN = frozenset({"kerberos_principal", "kerberos_keytab", "kerberos_cache", "hadoop_conf_dir"})
#: Storage that lives inside one process, which executors cannot reach.
PROCESS_LOCAL = ("memory://",)


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
    return master or configured_master() or f"local[{available_cores()}]"


def settings(master: str, cluster: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings lastlayer gives a Spark session it starts for ``master``.

    Local masters listen on 127.0.0.1 only, without the web UI, and their JVM starts with
    :func:`lastlayer.engines.jvm.local_java_options` (as ``spark.driver.defaultJavaOptions``, which
    Spark puts before any ``spark.driver.extraJavaOptions``). ``cluster`` adds the login's settings
    (:meth:`lastlayer.hadoop.HadoopLogin.spark_conf`: Spark logs in from the same keytab, the JVMs use
    the same krb5.conf and Hadoop configuration).
    """
    conf = {"spark.master": master, "spark.app.name": "lastlayer", "spark.ui.showConsoleProgress": "false"}
    cluster = cluster or {}
    if master.startswith("local"):
        conf.update(
            {
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.ui.enabled": "false",
                "spark.driver.defaultJavaOptions": jvm.local_java_options(
                    cluster.get("spark.driver.extraClassPath", "")
                ),
            }
        )
    conf.update(cluster)
    return conf


def start(master: str = "", cluster: Mapping[str, str] | None = None) -> SparkSession:
    """Start a Spark session with :func:`settings` for :func:`resolve_master`'s master.

    Raises:
        EngineError: Spark could not start (no Java, a bad master, ...), in one line.
    """
    require()
    from pyspark.sql import SparkSession

    logging.getLogger("py4j").setLevel(logging.WARNING)  # py4j logs every connection at INFO
    chosen = resolve_master(master)
    builder = SparkSession.builder
    for key, value in settings(chosen, cluster).items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # pyspark raises its own exception types, Java's come through py4j
        raise EngineError(start_problem(exc, chosen, jvm.java_executable())) from exc
    if chosen.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        spark.sparkContext.pythonExec = sys.executable  # local executors run this Python, which has lastlayer
    shipping.ship(spark)  # on a cluster, the executors run the driver's lastlayer
    log.info(
        "Spark %s started: master %s, %d cores", spark.version, chosen, spark.sparkContext.defaultParallelism
    )
    return spark


def start_problem(exc: BaseException, master: str, java: str | None) -> str:
    """Why a session for ``master`` did not start (``exc``), and what to check, in one line: Java when
    there is none (``java``: :func:`lastlayer.engines.jvm.java_executable`); Spark's launcher when it
    exited before its JVM answered (it printed why); else what the JVM said (a YARN submission, a bad
    master URL, a standalone master that does not answer ...)."""
    lines = [ln.strip().lstrip(": ") for ln in str(exc).splitlines() if ln.strip()]
    java_error = [ln for ln in lines if re.match(r"^[\w.$]+(Exception|Error): ", ln)]
    reason = (java_error or lines or [exc.__class__.__name__])[0][:500]
    if java is None:
        return (
            f"Spark could not start: it needs Java 17+, none was found (java on PATH or JAVA_HOME): {reason}"
        )
    if "JAVA_GATEWAY_EXITED" in reason:
        return (
            f"Spark's launcher exited before starting a session for master {master} (its reason is printed "
            "above): check the master, Spark's settings (spark-defaults.conf, --conf) and that "
            f"{java} is Java 17+"
        )
    if master.startswith("local"):
        return (
            f"Spark could not start a session on this machine ({master}): {reason} (Spark's log lines above "
            "say more; check the spark.* settings in spark-defaults.conf and PYSPARK_SUBMIT_ARGS)"
        )
    return (
        f"Spark could not start a session on the cluster of master {master}: {reason} (check that the "
        "cluster answers and accepts the application: its address, the Hadoop/YARN configuration, the login)"
    )


@contextmanager
def session(master: str = "", cluster: Mapping[str, str] | None = None) -> Iterator[SparkSession]:
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
    spark = start(master, cluster)
    try:
        yield spark
    finally:
        spark.stop()


def hadoop_user(spark: SparkSession) -> str:
    """Who Spark's Hadoop client is logged in as, e.g. ``tensorflow@LOCAL (KERBEROS, keytab)``."""
    ugi = spark.sparkContext._jvm.org.apache.hadoop.security.UserGroupInformation.getCurrentUser()  # type: ignore[union-attr]
    source = ", keytab" if ugi.isFromKeytab() else ""
    return f"{ugi.getUserName()} ({ugi.getAuthenticationMethod().toString()}{source})"


def check_url(url: str) -> None:
    """Refuse an image URL the executors cannot reach (storage inside this process).

    Raises:
        UsageError: naming the URL and what to do.
    """
    if url.startswith(PROCESS_LOCAL):
        raise UsageError(
            f"--engine=spark runs on executors in other processes, which cannot read {url}: "
            "use a local path, hdfs:// or another shared storage (or --engine=local)"
        )


def executor_options(
    storage_options: Mapping[str, Any] | None, master: str, cluster: Mapping[str, str]
) -> dict[str, Any]:
    """The storage options of the executors.

    On a local master they are the driver's (the executors are this machine). Elsewhere the
    ``hdfs``/``viewfs`` groups lose what names the driver's own login and files
    (:data:`DRIVER_LOGIN`) and get the Hadoop properties of ``cluster`` (``spark.hadoop.*``), so the
    executors' HDFS client takes its credentials from their environment: the delegation tokens of
    ``HADOOP_TOKEN_FILE_LOCATION`` on a Kerberized cluster.
    """
    options = dict(storage_options or {})
    if master.startswith("local"):
        return options
    hadoop = {k.removeprefix("spark.hadoop."): v for k, v in cluster.items() if k.startswith("spark.hadoop.")}
    for protocol in ("hdfs", "viewfs"):
        group = options.get(protocol)
        if isinstance(group, Mapping) or hadoop:
            own = {k: v for k, v in (group or {}).items() if k not in DRIVER_LOGIN}
            options[protocol] = {**hadoop, **own}
    return options


# -- the driver -------------------------------------------------------------------------------
def _reason(exc: BaseException) -> str:
    """The most telling line of a Spark failure (the Python exception of a failed task, if any)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    python = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln) and "py4j" not in ln]
    return (python[-1] if python else lines[0] if lines else exc.__class__.__name__)[:500]


def _run_wave(
    spark: SparkSession,
    wave: list[Task],
    folders: CacheFolders,
    remote: CacheFolders,
    run: str,
    **kwargs: Any,
) -> list[Result]:
    """One Spark job over ``wave``, whose tasks write to ``remote`` (``folders`` as the executors
    reach them); its part files committed to ``folders``; a result per task."""
    from lastlayer.bottlenecks.staging import commit, discard

    sc = spark.sparkContext
    slices = min(len(wave) // MIN_TASK_IMAGES, PARTITIONS_PER_CORE * sc.defaultParallelism)
    job = sc.parallelize(wave, max(1, slices)).mapPartitions(
        functools.partial(executor.extract, folders=remote, run=run, **kwargs)
    )
    places = [
        (folder, d) for d, folder in enumerate((folders.plain, folders.distorted)) if folder is not None
    ]
    try:
        outcomes: list[Outcome] = job.collect()
    except Exception as exc:  # py4j / pyspark errors: a stage failed after Spark's retries
        for folder, _ in places:
            discard(folder, run, folders.storage_options)
        raise EngineError(f"the Spark job failed: {_reason(exc)}") from exc
    for folder, distorted in places:
        names = [o.part for o in outcomes if o.part is not None and o.distorted == bool(distorted)]
        commit(folder, run, names, folders.storage_options)
    by_index = {t.index: t for t in wave}
    return [
        Result(by_index[o.index], o.content, error=o.error, stored=o.stored) for o in outcomes if o.index >= 0
    ]


class SparkEngine(Engine):
    """Spark executors (see the module doc).

    Attributes:
        master: the Spark master ("": :func:`resolve_master`'s choice).
        batch_size: images per network call.
        cluster: the login's Spark settings (Kerberos, Hadoop configuration).
    """

    name = "spark"
    writes_cache = True

    def __init__(
        self,
        master: str = "",
        batch_size: int = 4,
        storage_options: Mapping[str, Any] | None = None,
        cluster: Mapping[str, str] | None = None,
    ) -> None:
        require()
        self.master = master
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.cluster = dict(cluster or {})
        self._stack = ExitStack()
        self._spark: SparkSession | None = None

    @classmethod
    def from_config(
        cls, config: EngineConfig, storage_options: Mapping[str, Any] | None, spark_conf: Mapping[str, str]
    ) -> SparkEngine:
        return cls(config.spark_master, config.batch_size, storage_options, spark_conf)

    def spark(self) -> SparkSession:
        """The session: the active one, or one started for :attr:`master` (stopped by :meth:`close`)."""
        if self._spark is None:
            self._spark = self._stack.enter_context(session(self.master, self.cluster))
        return self._spark

    def __enter__(self) -> SparkEngine:
        self.spark()  # before other threads exist: pyspark forks its JVM from this process
        return self

    def close(self) -> None:
        self._stack.close()
        self._spark = None

    def extract(
        self,
        tasks: Sequence[Task],
        model: FeatureModel,
        need: NeedTest,
        distortions: Distortions = NO_DISTORTIONS,
        progress: Callable[[int], None] | None = None,
        cache: CacheFolders | None = None,
    ) -> Iterator[Result]:
        """One Spark job per wave of images (see the module doc); ``progress`` after each wave.

        Raises:
            UsageError: an image URL the executors cannot reach, or no ``cache`` given.
            EngineError: a stage failed after Spark's retries.
        """
        if cache is None:
            raise UsageError(
                "the Spark engine writes the bottleneck cache itself: pass cache=CacheFolders(...)"
            )
        if tasks:
            check_url(tasks[0].url)  # refused before any job
        spark = self.spark()
        if "spark.kerberos.principal" in self.cluster:
            log.info("Spark reads the images as %s", hadoop_user(spark))
        yield from self._waves(spark, tasks, model, need, distortions, progress, cache)

    def _waves(
        self,
        spark: SparkSession,
        tasks: Sequence[Task],
        model: FeatureModel,
        need: NeedTest,
        distortions: Distortions,
        progress: Callable[[int], None] | None,
        folders: CacheFolders,
    ) -> Iterator[Result]:
        from lastlayer.bottlenecks.staging import discard_stale, new_run

        sc = spark.sparkContext
        remote = dataclasses.replace(
            folders, storage_options=executor_options(folders.storage_options, sc.master, self.cluster)
        )
        for folder in (folders.plain, folders.distorted):
            if folder is not None:
                discard_stale(folder, STALE_STAGING_S, folders.storage_options)
        model_bc, need_bc = sc.broadcast(Network.of(model)), sc.broadcast(need.portable())
        wave_size = max(WAVE_MIN, WAVE_PER_CORE * sc.defaultParallelism)
        run, done = new_run(), 0
        try:
            for number, wave in enumerate(chunks(tasks, wave_size)):
                yield from _run_wave(
                    spark, wave, folders, remote, f"{run}-{number}", model_bc=model_bc, need_bc=need_bc,
                    distortions=distortions, batch_size=self.batch_size,
                )  # fmt: skip
                done += len(wave)
                if progress is not None:
                    progress(done)
        finally:
            model_bc.destroy()
            need_bc.destroy()
