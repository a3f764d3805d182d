"""A real Kerberized HDFS for the hdfs tests: MIT KDC + secure MiniDFSCluster, started once a session.

The harness lives in harness/securehdfs.py (imported by path). When it cannot start, the fixture
fails with the reason: CI must prove the secure cluster works. Set LASTLAYER_SKIP_HDFS=1 to skip
these tests instead (e.g. on a machine without Java, Maven or the MIT KDC).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from helpers import serve_folder

HARNESS = Path(__file__).resolve().parents[2] / "harness" / "securehdfs.py"
START_TIMEOUT_S = float(os.environ.get("LASTLAYER_HDFS_START_TIMEOUT", "180"))


def load_harness() -> ModuleType:
    """harness/securehdfs.py as module ``securehdfs`` (loaded once)."""
    mod = sys.modules.get("securehdfs")
    if mod is not None and getattr(mod, "__file__", None) == str(HARNESS):
        return mod
    spec = importlib.util.spec_from_file_location("securehdfs", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["securehdfs"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def securehdfs() -> ModuleType:
    return load_harness()


@pytest.fixture(scope="session")
def secure_hdfs(securehdfs: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The running KDC + secure MiniDFSCluster (a ``securehdfs.SecureHdfs``), stopped at session end."""
    if os.environ.get("LASTLAYER_SKIP_HDFS") == "1":
        pytest.skip("LASTLAYER_SKIP_HDFS=1: secure HDFS tests skipped")
    state = tmp_path_factory.mktemp("securehdfs")
    try:
        cluster = securehdfs.SecureHdfs.start(state, timeout=START_TIMEOUT_S)
    except Exception as exc:
        pytest.fail(
            f"the secure HDFS harness could not start (set LASTLAYER_SKIP_HDFS=1 to skip): {exc}",
            pytrace=False,
        )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def secure_yarn(secure_hdfs) -> object:
    """The secure HDFS with its secure MiniYARNCluster started (once a session, on first use; stopped
    with the HDFS): ``secure_yarn.rm_address``, ``rm_web_url``, ``conf_dir`` with ``yarn-site.xml``."""
    try:
        secure_hdfs.start_yarn(timeout=START_TIMEOUT_S)
    except Exception as exc:
        pytest.fail(f"the secure YARN harness could not start: {exc}", pytrace=False)
    return secure_hdfs


@pytest.fixture(scope="module")
def endpoint(secure_hdfs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A job's hdfs.config_uri: the harness's core-site.xml and hdfs-site.xml (nameservice `default`
    included) served over HTTP on 127.0.0.1, as DC/OS serves its HDFS endpoints."""
    www = tmp_path_factory.mktemp("www")
    served = www / "v1" / "endpoints"
    served.mkdir(parents=True)
    for name in ("core-site.xml", "hdfs-site.xml"):
        shutil.copy(secure_hdfs.conf_dir / name, served)
    with serve_folder(www) as base:
        yield f"{base}/v1/endpoints"


@pytest.fixture
def as_user(secure_hdfs, monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], dict[str, str]]:
    """``as_user("tensorflow")``: put that user's client environment (KRB5_CONFIG, HADOOP_CONF_DIR,
    a fresh KRB5CCNAME after kinit; None: no ticket) into os.environ for this test; returns it."""

    def switch(user: str | None) -> dict[str, str]:
        env = secure_hdfs.env(user)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env

    return switch
