"""A local Spark master's JVM options (:mod:`lastlayer.engines.jvm`): the class-data sharing archive is
dumped by a JVM to a file of its own, renamed into place by a later start once finished, then mapped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lastlayer.engines import jvm

WHOLE = jvm.MAGIC + bytes(4092)  # a finished dump: the JVM writes the header last
UNFINISHED = bytes(4096)


def dump_path(options: str) -> Path:
    (flag,) = [o for o in options.split() if o.startswith("-XX:ArchiveClassesAtExit=")]
    return Path(flag.partition("=")[2])


def test_without_an_archive_each_jvm_dumps_to_a_file_of_its_own(tmp_path: Path):
    first, second = (jvm.sharing_options(tmp_path, "spark-x.jsa") for _ in range(2))
    assert dump_path(first).parent == tmp_path and dump_path(first).name.startswith("spark-x.jsa.")
    assert dump_path(first) != dump_path(second) and first.endswith(jvm.QUIET)


def test_a_finished_dump_becomes_the_archive_that_later_jvms_map(tmp_path: Path):
    dumps = [dump_path(jvm.sharing_options(tmp_path, "spark-x.jsa")) for _ in range(2)]
    for dump in dumps:  # two concurrent first runs: one dump becomes the archive, the other goes
        dump.write_bytes(WHOLE)
    assert jvm.sharing_options(tmp_path, "spark-x.jsa") == (
        f"-XX:SharedArchiveFile={tmp_path / 'spark-x.jsa'} {jvm.QUIET}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["spark-x.jsa"]


def test_an_unfinished_dump_is_left_to_its_jvm_and_removed_once_dead(tmp_path: Path):
    unfinished = dump_path(jvm.sharing_options(tmp_path, "spark-x.jsa"))
    unfinished.write_bytes(UNFINISHED)
    assert "-XX:ArchiveClassesAtExit=" in jvm.sharing_options(tmp_path, "spark-x.jsa")
    assert unfinished.exists() and not (tmp_path / "spark-x.jsa").exists()
    later = unfinished.stat().st_mtime + jvm.DEAD_DUMP_S + 1
    jvm.sharing_options(tmp_path, "spark-x.jsa", now=later)
    assert not unfinished.exists()


def test_the_options_name_an_archive_per_class_path_or_go_without_one(tmp_path: Path):
    folder = tmp_path / "cache" / "spark-cds"
    options = jvm.local_java_options(folder=folder)
    assert options.startswith(jvm.LOCAL_JVM_OPTIONS + " -XX:ArchiveClassesAtExit=")
    assert folder.is_dir() and dump_path(options).parent == folder
    other = jvm.local_java_options("/opt/extra.jar", folder)  # another class path, another archive
    assert dump_path(other).name.split(".")[0] != dump_path(options).name.split(".")[0]
    blocked = tmp_path / "a file"
    blocked.write_text("")
    assert jvm.local_java_options(folder=blocked / "spark-cds") == jvm.LOCAL_JVM_OPTIONS


def test_the_cache_folder_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jvm.archive_folder() == tmp_path / "lastlayer" / "spark-cds"


@pytest.mark.spark
def test_a_real_jvm_dumps_a_finished_archive_that_the_next_one_maps(tmp_path: Path):
    java = jvm.java_executable()
    assert java is not None, "no Java: the Spark tests need Java 17+"

    def run(share: str) -> str:
        argv = [java, *jvm.sharing_options(tmp_path, "a.jsa").split(), f"-Xshare:{share}", "-version"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
        return done.stdout + done.stderr

    assert "[cds" not in run("auto")  # quiet while it dumps at exit
    (dump,) = tmp_path.iterdir()
    assert jvm.complete(dump) and os.access(dump, os.R_OK)
    assert "sharing" in run("on")  # renamed into place and mapped; on: a JVM that cannot map it fails
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsa"]
