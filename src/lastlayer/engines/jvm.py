"""The JVM options of a local Spark master: the quick compiler, the serial collector, and a class-data
sharing archive of the classes Spark loads.

A local master's JVM only schedules tasks (the executors' work is Python), so its start-up is most of
its cost: loading and verifying Spark's classes. The JDK's dynamic class-data sharing (JDK 13+) keeps
them, parsed and verified, in an archive that later JVMs map: measured on 2 cores, the session starts
and runs its first job ~2 s sooner. A JVM started while there is no archive dumps its classes when it
exits (``-XX:ArchiveClassesAtExit``, about 100 MB) to a file of its own; the next start renames a
finished dump to the archive (:func:`settle`), and JVMs from then on map it
(``-XX:SharedArchiveFile``). The archive lives in :func:`archive_folder`, named after what it holds
(the Java executable, Spark's jars, the driver's extra class path): another JDK or Spark gets its own.

Why a dump of its own, then a rename: the archive's name then only ever holds a whole archive, and
JVMs that map it are never disturbed, whatever JVMs start or exit meanwhile and however the JDK writes
its dumps (undocumented). A dump is finished when its header is there (the JVM writes it last,
:func:`complete`); one still unfinished :data:`DEAD_DUMP_S` after it was last written died with its
JVM, and is removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path

#: The quick compiler alone and the serial collector: the JVM starts about 2 s sooner on 2 cores.
LOCAL_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
#: The JVM's class-data sharing messages (hundreds of "class not supported" lines while it writes an
#: archive) would go to the driver's standard output.
QUIET = "-Xlog:cds=off -Xlog:cds+dynamic=off"
#: The first bytes of a complete dynamic archive (``CDS_DYNAMIC_ARCHIVE_MAGIC``, little-endian).
MAGIC = (0xF00BABA8).to_bytes(4, "little")
#: Seconds after which an archive without its header is taken for a dump that died (one takes ~2 s).
DEAD_DUMP_S = 600.0


def archive_folder() -> Path:
    """Where the archives live: ``$XDG_CACHE_HOME/lastlayer/spark-cds`` (``~/.cache`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache, "lastlayer", "spark-cds")


def java_executable() -> str | None:
    """The Java executable Spark's launcher runs (``$JAVA_HOME/bin/java``, else ``java`` on ``PATH``),
    links resolved; ``None`` when there is none."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    return os.path.realpath(java) if java and os.path.isfile(java) else None


def archive_name(extra_class_path: str = "") -> str | None:
    """``spark-<hash>.jsa``, the hash over the Java executable Spark starts (``$JAVA_HOME/bin/java``,
    else ``java`` on ``PATH``), the names and sizes of Spark's jars and ``extra_class_path``; ``None``
    when Java or Spark's jars are not found."""
    from pyspark.find_spark_home import _find_spark_home  # how pyspark itself finds its jars

    java = java_executable()
    jars = Path(_find_spark_home(), "jars")
    if java is None or not jars.is_dir():
        return None
    try:
        java_stat = os.stat(java)
        listing = sorted((p.name, p.stat().st_size) for p in jars.glob("*.jar"))
    except OSError:
        return None
    digest = hashlib.sha256(repr((java, java_stat.st_size, java_stat.st_mtime_ns)).encode())
    digest.update(repr((listing, extra_class_path)).encode())
    return f"spark-{digest.hexdigest()[:16]}.jsa"


def complete(archive: Path) -> bool:
    """Whether ``archive`` holds a whole archive: the JVM writes its header, :data:`MAGIC` first, last."""
    try:
        with open(archive, "rb") as file:
            return file.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def settle(dump: Path, archive: Path, now: float) -> None:
    """A finished ``dump`` becomes ``archive`` (renamed, when there is none yet) or goes; an unfinished
    one goes once it is :data:`DEAD_DUMP_S` old. Another process settling the same dump meanwhile is
    harmless (the loser's rename or removal finds nothing)."""
    try:
        if complete(dump):
            if complete(archive):
                dump.unlink()
            else:
                os.replace(dump, archive)
        elif now - dump.stat().st_mtime > DEAD_DUMP_S:
            dump.unlink()
    except OSError:
        pass


def sharing_options(folder: Path, name: str, now: float | None = None) -> str:
    """The class-data sharing options for the archive ``folder/name``, once the finished dumps of
    earlier JVMs are settled (:func:`settle`): map it when it is complete, else have this JVM dump its
    classes at exit to a name of its own (``name.<random>.tmp``), which a later start settles."""
    archive = folder / name
    for dump in folder.glob(f"{name}.*.tmp"):
        settle(dump, archive, time.time() if now is None else now)
    if complete(archive):
        return f"-XX:SharedArchiveFile={archive} {QUIET}"
    return f"-XX:ArchiveClassesAtExit={folder / f'{name}.{uuid.uuid4().hex}.tmp'} {QUIET}"


def local_java_options(extra_class_path: str = "", folder: Path | None = None) -> str:
    """:data:`LOCAL_JVM_OPTIONS` and :func:`sharing_options` for the archive in ``folder`` (default
    :func:`archive_folder`); the former alone when the folder cannot be made or the archive named."""
    name = archive_name(extra_class_path)
    folder = archive_folder() if folder is None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return LOCAL_JVM_OPTIONS
    if name is None or not os.access(folder, os.W_OK):
        return LOCAL_JVM_OPTIONS
    return f"{LOCAL_JVM_OPTIONS} {sharing_options(folder, name)}"
