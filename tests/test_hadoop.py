"""Hadoop client configuration: from a folder, or downloaded from an endpoint (hdfs.config_uri)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import serve_folder
from lastlayer import hadoop
from lastlayer.errors import StorageError

CORE = b"<configuration><property><name>fs.defaultFS</name><value>hdfs://127.0.0.1:1</value></property></configuration>"


@pytest.fixture
def endpoint(tmp_path: Path):
    """An HTTP server on 127.0.0.1 serving core-site.xml and hdfs-site.xml under /v1/endpoints."""
    served = tmp_path / "www" / "v1" / "endpoints"
    served.mkdir(parents=True)
    (served / "core-site.xml").write_bytes(CORE)
    (served / "hdfs-site.xml").write_bytes(b"<configuration/>")
    with serve_folder(tmp_path / "www") as base:
        yield f"{base}/v1/endpoints"


def test_config_uri_is_downloaded_into_a_private_folder(endpoint, monkeypatch):
    monkeypatch.delenv("HADOOP_CONF_DIR", raising=False)
    folder = hadoop.configure(config_uri=endpoint)
    assert folder == os.environ["HADOOP_CONF_DIR"]
    assert (Path(folder) / "core-site.xml").read_bytes() == CORE
    assert oct(Path(folder).stat().st_mode & 0o777) == "0o700"


def test_missing_files_and_unreachable_endpoints_are_clear(endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("HADOOP_CONF_DIR", raising=False)
    with pytest.raises(StorageError, match=r"cannot download .*/nowhere/core-site\.xml"):
        hadoop.configure(config_uri=endpoint.replace("/v1/endpoints", "/nowhere"))
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "core-site.xml").write_bytes(CORE)
    with pytest.raises(StorageError, match=r"lacks hdfs-site\.xml"):
        hadoop.configure(conf_dir=str(tmp_path / "conf"))
