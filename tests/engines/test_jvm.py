"""A local Spark master's JVM options (:mod:`lastlayer.engines.jvm`): the class-data sharing archive is
written when missing or dead, mapped when complete, left alone while another JVM writes it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lastlayer.engines import jvm


def test_the_archive_is_written_when_missing_or_dead_mapped_when_complete(tmp_path: Path):
    archive = tmp_path / "spark-x.jsa"
    assert jvm.sharing_options(archive) == f"-XX:ArchiveClassesAtExit={archive} {jvm.QUIET}"
    archive.write_bytes(bytes(4096))  # a dump under way: the JVM writes the header last
    assert jvm.sharing_options(archive) == ""
    later = archive.stat().st_mtime + jvm.DEAD_DUMP_S + 1
    assert jvm.sharing_options(archive, now=later) == f"-XX:ArchiveClassesAtExit={archive} {jvm.QUIET}"
    archive.write_bytes(jvm.MAGIC + bytes(4092))
    assert jvm.sharing_options(archive, now=later) == f"-XX:SharedArchiveFile={archive} {jvm.QUIET}"


def test_the_options_name_an_archive_per_class_path_or_go_without_one(tmp_path: Path):
    folder = tmp_path / "cache" / "spark-cds"
    options = jvm.local_java_options(folder=folder)
    assert options.startswith(jvm.LOCAL_JVM_OPTIONS + " -XX:ArchiveClassesAtExit=")
    assert folder.is_dir() and f"={folder}/spark-" in options
    assert jvm.local_java_options("/opt/extra.jar", folder) != options  # another class path, another file
    blocked = tmp_path / "a file"
    blocked.write_text("")
    assert jvm.local_java_options(folder=blocked / "spark-cds") == jvm.LOCAL_JVM_OPTIONS


def test_the_cache_folder_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jvm.archive_folder() == tmp_path / "lastlayer" / "spark-cds"


@pytest.mark.spark
def test_a_real_jvm_writes_a_complete_archive_that_the_next_one_maps(tmp_path: Path):
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if "JAVA_HOME" in os.environ else "java"
    archive = tmp_path / "a.jsa"

    def run(share: str) -> str:
        argv = [java, *jvm.sharing_options(archive).split(), f"-Xshare:{share}", "-version"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
        return done.stdout + done.stderr

    assert "[cds" not in run("auto")  # quiet while it writes the archive at exit
    assert archive.read_bytes()[:4] == jvm.MAGIC
    assert "sharing" in run("on")  # on: a JVM that cannot map the archive fails
