"""Shared fixtures and hooks (the suite needs no external data); helper functions are in helpers.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import make_dataset


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated three-class image folder (30 JPEGs per class)."""
    return make_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole session, so each network is built once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def _no_stale_cli_log_handler() -> Iterator[None]:
    """Remove the log handler a ``main([...])`` call installed on the test's captured stderr, which is
    closed once the test ends: a record logged by the next test would be a "Logging error" there."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_lastlayer", False)]:
        root.removeHandler(handler)


_SPARK: dict[str, object] = {}
HDFS_TESTS = Path(__file__).resolve().parent / "hdfs"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark what needs Java: the tests under tests/hdfs (``hdfs``) and those using Spark (``spark``),
    so that ``pytest -m "not hdfs and not spark"`` runs on a machine without Java or a KDC."""
    for item in items:
        if HDFS_TESTS in Path(item.path).parents:
            item.add_marker(pytest.mark.hdfs)
        if "spark_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the tests' Spark session before any test runs, when some test needs it: pyspark launches
    its JVM from a forked child, which must not inherit the threads earlier tests leave (hdfs-native's)."""
    wanted = any("spark_session" in getattr(item, "fixturenames", ()) for item in session.items)
    if not wanted or os.environ.get("LASTLAYER_SKIP_SPARK") == "1":
        return
    from lastlayer.engines import spark

    try:
        _SPARK["session"] = spark.start("local[2,2]")
    except Exception as exc:  # reported by the fixture, in the tests that need Spark
        _SPARK["error"] = exc


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "session" in _SPARK:
        _SPARK.pop("session").stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def spark_session():
    """One Spark session (``local[2,2]``: 2 cores, a failed task tried twice) for the whole test run.

    The Spark tests fail when pyspark or Java is missing (CI must prove the engine works); set
    LASTLAYER_SKIP_SPARK=1 to skip them instead.
    """
    if os.environ.get("LASTLAYER_SKIP_SPARK") == "1":
        pytest.skip("LASTLAYER_SKIP_SPARK=1: Spark engine tests skipped")
    if "error" in _SPARK:
        pytest.fail(f"Spark could not start (set LASTLAYER_SKIP_SPARK=1 to skip): {_SPARK['error']}")
    session = _SPARK["session"]
    session.sparkContext.setLogLevel("ERROR")  # type: ignore[attr-defined]
    return session
