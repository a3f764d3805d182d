"""Hadoop client configuration: from a folder, or downloaded from an endpoint (hdfs.config_uri)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import serve_folder
from lastlayer.errors import DataError, StorageError
from lastlayer.hadoop import ClusterConfig, HadoopLogin
from lastlayer.hadoop import config as hadoop_config

CORE = b"<configuration><property><name>fs.defaultFS</name><value>hdfs://127.0.0.1:1</value></property></configuration>"
HDFS = b"<configuration><property><name>dfs.replication</name><value>1</value></property></configuration>"


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
    before = dict(os.environ)
    with HadoopLogin(ClusterConfig(hdfs_config_uri=endpoint)) as hadoop:
        folder = hadoop.conf_dir
        assert hadoop.env() == {"HADOOP_CONF_DIR": folder}
        assert dict(os.environ) == before  # the library leaves the environment alone
        assert (Path(folder) / "core-site.xml").read_bytes() == CORE
        assert oct(Path(folder).stat().st_mode & 0o777) == "0o700"
        assert oct(Path(folder).parent.stat().st_mode & 0o777) == "0o700"
        assert hadoop.properties == {"fs.defaultFS": "hdfs://127.0.0.1:1"}
    assert not Path(folder).parent.exists()  # removed on exit


def test_missing_files_and_unreachable_endpoints_are_clear(endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("HADOOP_CONF_DIR", raising=False)
    with (
        pytest.raises(StorageError, match=r"cannot download .*/nowhere/core-site\.xml"),
        HadoopLogin(ClusterConfig(hdfs_config_uri=endpoint.replace("/v1/endpoints", "/nowhere"))),
    ):
        pass
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "core-site.xml").write_bytes(CORE)
    with (
        pytest.raises(StorageError, match=r"lacks hdfs-site\.xml"),
        HadoopLogin(ClusterConfig(hadoop_conf_dir=str(tmp_path / "conf"))),
    ):
        pass


def test_a_folder_is_used_in_place_and_read_hdfs_site_over_core_site(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "core-site.xml").write_bytes(CORE.replace(b"</configuration>", HDFS[15:]))
    (conf / "hdfs-site.xml").write_bytes(HDFS.replace(b">1<", b">3<"))
    with HadoopLogin(ClusterConfig(hadoop_conf_dir=str(conf))) as hadoop:
        assert hadoop.conf_dir == str(conf)
        assert hadoop.properties == {"fs.defaultFS": "hdfs://127.0.0.1:1", "dfs.replication": "3"}
    assert (conf / "core-site.xml").exists()  # the user's folder stays


@pytest.mark.parametrize(
    ("served", "message"),
    [
        (
            b"<html><body>Service Unavailable</body></html>",
            r"not a Hadoop configuration: its root element is <html>",
        ),
        (b"<html><body>unclosed", r"core-site\.xml is not well-formed XML"),
        (
            b'<!DOCTYPE c [<!ENTITY a "aaaa">]><configuration>&a;</configuration>',
            r"core-site\.xml declares XML entities",
        ),
    ],
)
def test_downloaded_files_must_be_hadoop_configurations(endpoint, tmp_path, served, message):
    (tmp_path / "www" / "v1" / "endpoints" / "core-site.xml").write_bytes(served)
    with pytest.raises(DataError, match=message) as exc, HadoopLogin(ClusterConfig(hdfs_config_uri=endpoint)):
        pass
    assert "/v1/endpoints/core-site.xml" in str(exc.value)


def test_download_limits_are_the_flags_named_in_messages(endpoint):
    config = ClusterConfig(hdfs_config_uri=endpoint, hdfs_config_max_bytes=10)
    too_big = r"more than the 10 allowed; raise --hdfs_config_max_bytes"
    with pytest.raises(DataError, match=too_big), HadoopLogin(config):
        pass
    assert config.download_limits.seconds_setting == "--hdfs_config_timeout"
    assert config.download_limits.seconds == 30.0


def test_check_reads_the_properties(tmp_path):
    assert hadoop_config.check(CORE, "core-site.xml", "x") == {"fs.defaultFS": "hdfs://127.0.0.1:1"}
    assert hadoop_config.check(b"<configuration/>", "hdfs-site.xml", "x") == {}
