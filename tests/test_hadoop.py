"""Hadoop client configuration: from a folder, or downloaded from an endpoint (hdfs.config_uri)."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

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
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/endpoints"
    server.shutdown()
    thread.join(timeout=10)


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
