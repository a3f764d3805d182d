"""The explicit Hadoop login without a KDC: flags, what it yields, renewal timing, errors.

The real keytab login, its private cache, renewal from the keytab and two logins side by side are
tested against the secure HDFS in tests/hdfs/test_login_hdfs.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
import pytest

from lastlayer import storage
from lastlayer.cli import cluster
from lastlayer.errors import KerberosError, UsageError
from lastlayer.hadoop import ClusterConfig, HadoopLogin
from lastlayer.hadoop import fs as hadoop_fs
from lastlayer.hadoop.login import MIN_MARGIN_S, default_realm, renewal_delay
from lastlayer.settings import fields

CORE = b"<configuration><property><name>fs.defaultFS</name><value>hdfs://127.0.0.1:1</value></property></configuration>"
needs_kinit = pytest.mark.skipif(shutil.which("kinit") is None, reason="needs MIT kinit (krb5-user)")


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "core-site.xml").write_bytes(CORE)
    (folder / "hdfs-site.xml").write_bytes(b"<configuration/>")
    return folder


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the login's temporary folders go, to see that none is left behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_principal_and_keytab_go_together():
    with pytest.raises(UsageError, match=r"--principal needs --keytab: pass both, or neither"):
        HadoopLogin(ClusterConfig(principal="tensorflow@LOCAL"))
    with pytest.raises(UsageError, match=r"--keytab needs --principal"):
        HadoopLogin(ClusterConfig(keytab="/k/tensorflow.keytab"))
    with pytest.raises(UsageError, match=r"--hdfs_config_timeout=0\.0: must be > 0"):
        HadoopLogin(ClusterConfig(hdfs_config_timeout=0.0))


def test_renewal_comes_when_a_fifth_of_the_lifetime_is_left_and_never_later_than_the_margin():
    assert renewal_delay(starts=0, expires=1000, now=0) == 800
    assert renewal_delay(starts=0, expires=1000, now=500) == 300
    assert renewal_delay(starts=0, expires=1000, now=900) == 0  # overdue: at once
    assert renewal_delay(starts=0, expires=10, now=0) == 10 - MIN_MARGIN_S  # short tickets keep a margin
    assert renewal_delay(starts=0, expires=3, now=0) == 0


def test_a_keytab_login_yields_explicit_options_conf_and_env(conf_dir):
    """What a keytab login hands to storage, Spark and child processes (read before entering: the
    values come from the flags; entering adds the ticket and the configuration's properties)."""
    login = HadoopLogin(
        ClusterConfig(
            principal="tensorflow@LOCAL",
            keytab="k/tensorflow.keytab",
            krb5_conf="/etc/lastlayer-krb5.conf",
            hadoop_conf_dir=str(conf_dir),
        )
    )
    assert login.keytab == os.path.abspath("k/tensorflow.keytab")
    login.ccache, login.conf_dir = "FILE:/private/ccache", str(conf_dir)
    login.properties = {"fs.defaultFS": "hdfs://nn:8020"}
    assert login.spark_conf() == {
        "spark.hadoop.fs.defaultFS": "hdfs://nn:8020",
        "spark.driver.extraClassPath": str(conf_dir),
        "spark.kerberos.principal": "tensorflow@LOCAL",
        "spark.kerberos.keytab": os.path.abspath("k/tensorflow.keytab"),
        "spark.driver.extraJavaOptions": "-Djava.security.krb5.conf=/etc/lastlayer-krb5.conf",
        "spark.executor.extraJavaOptions": "-Djava.security.krb5.conf=/etc/lastlayer-krb5.conf",
    }
    assert login.env() == {
        "KRB5CCNAME": "FILE:/private/ccache",
        "KRB5_CONFIG": "/etc/lastlayer-krb5.conf",
        "HADOOP_CONF_DIR": str(conf_dir),
    }


def test_storage_options_name_the_login_per_protocol(conf_dir, monkeypatch):
    monkeypatch.setenv("KRB5_CONFIG", "/etc/lastlayer-krb5.conf")
    login = HadoopLogin(
        ClusterConfig(
            principal="tensorflow@LOCAL", keytab="/k/t.keytab", krb5_conf="/etc/lastlayer-krb5.conf"
        )
    )
    login.ccache, login.conf_dir = "FILE:/private/ccache", str(conf_dir)
    options = login.storage_options()
    native = {
        "hadoop_conf_dir": str(conf_dir),
        "kerberos_principal": "tensorflow@LOCAL",
        "kerberos_cache": "FILE:/private/ccache",
    }
    assert options["hdfs"] == native and options["viewfs"] == native
    assert options["webhdfs"]["kerberos"] is True
    spnego = pytest.importorskip("spnego")
    assert options["webhdfs"]["kerb_kwargs"] == {
        "principal": spnego.KerberosCCache(ccache="FILE:/private/ccache", principal="tensorflow@LOCAL")
    }


def test_without_a_principal_the_ticket_cache_is_used_as_it_is(conf_dir, monkeypatch, private_tmp):
    monkeypatch.setenv("KRB5CCNAME", "FILE:/somewhere/krb5cc")
    with HadoopLogin(ClusterConfig(hadoop_conf_dir=str(conf_dir))) as login:
        assert login.ccache == "FILE:/somewhere/krb5cc" and login.expires == 0
        assert login.storage_options() == {
            "hdfs": {"hadoop_conf_dir": str(conf_dir)},
            "viewfs": {"hadoop_conf_dir": str(conf_dir)},
            "webhdfs": {"kerberos": True},
        }
        assert login.env() == {"HADOOP_CONF_DIR": str(conf_dir)}
        assert login.spark_conf() == {
            "spark.hadoop.fs.defaultFS": "hdfs://127.0.0.1:1",
            "spark.driver.extraClassPath": str(conf_dir),
        }
    monkeypatch.delenv("KRB5CCNAME")
    with HadoopLogin(ClusterConfig()) as login:
        assert login.storage_options() == {} and login.env() == {} and login.spark_conf() == {}
    assert list(private_tmp.iterdir()) == []


def test_a_krb5_conf_the_process_does_not_use_is_refused_for_in_process_clients(tmp_path, monkeypatch):
    """MIT Kerberos reads KRB5_CONFIG from the environment only: a login on another krb5.conf gives
    no storage options (they would use the process's file), but still its env() and spark_conf()."""
    krb5 = tmp_path / "krb5.conf"
    krb5.write_text("[libdefaults]\n default_realm = LOCAL\n")
    monkeypatch.setenv("KRB5_CONFIG", str(tmp_path / "other.conf"))
    with HadoopLogin(ClusterConfig(krb5_conf=str(krb5))) as login:
        with pytest.raises(KerberosError, match=rf"set KRB5_CONFIG={krb5} before starting Python"):
            login.storage_options()
        assert login.env() == {"KRB5_CONFIG": str(krb5)}
        assert "-Djava.security.krb5.conf" in login.spark_conf()["spark.driver.extraJavaOptions"]
        monkeypatch.setenv("KRB5_CONFIG", f"{tmp_path / 'other.conf'}:{krb5}")  # one of the files: fine
        assert login.storage_options() == {}
    monkeypatch.delenv("KRB5_CONFIG")
    with HadoopLogin(ClusterConfig(krb5_conf=str(krb5))) as login, pytest.raises(KerberosError):
        login.storage_options()  # the process's file is /etc/krb5.conf
    monkeypatch.setenv("KRB5_CONFIG", str(krb5))
    assert default_realm() == "LOCAL"


def test_a_missing_keytab_or_kinit_is_a_clear_error(tmp_path, monkeypatch, private_tmp):
    config = ClusterConfig(principal="tensorflow@LOCAL", keytab=str(tmp_path / "nope.keytab"))
    with (
        pytest.raises(
            KerberosError, match=r"keytab .*nope\.keytab does not exist: pass the keytab of tensorflow"
        ),
        HadoopLogin(config),
    ):
        pass
    (tmp_path / "t.keytab").write_bytes(b"\x05\x02")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    config = ClusterConfig(principal="tensorflow@LOCAL", keytab=str(tmp_path / "t.keytab"))
    with (
        pytest.raises(KerberosError, match=r"kinit not found: install the MIT Kerberos clients"),
        HadoopLogin(config),
    ):
        pass
    assert list(private_tmp.iterdir()) == []  # a failed login leaves no private folder


@needs_kinit
def test_an_unreachable_kdc_is_a_clear_error_and_leaves_nothing_behind(tmp_path, private_tmp):
    krb5 = tmp_path / "krb5.conf"
    krb5.write_text(
        "[libdefaults]\n default_realm = LOCAL\n dns_lookup_kdc = false\n udp_preference_limit = 1\n"
        "[realms]\n LOCAL = {\n  kdc = 127.0.0.1:9\n }\n"
    )
    (tmp_path / "t.keytab").write_bytes(b"\x05\x02")  # an empty keytab: no key for the principal
    config = ClusterConfig(
        principal="tensorflow@LOCAL", keytab=str(tmp_path / "t.keytab"), krb5_conf=str(krb5)
    )
    with (
        pytest.raises(
            KerberosError, match=r"cannot log in as tensorflow@LOCAL from .*t\.keytab: .*check the"
        ),
        HadoopLogin(config),
    ):
        pass
    assert list(private_tmp.iterdir()) == []


def test_a_given_folder_keeps_what_it_held(tmp_path, conf_dir):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "keytab").write_bytes(b"secret")
    with HadoopLogin(ClusterConfig(hdfs_config_uri=f"file://{conf_dir}"), folder=str(private)) as login:
        assert login.conf_dir == str(private / "hadoop-conf")
        assert (private / "hadoop-conf" / "core-site.xml").read_bytes() == CORE
    assert sorted(p.name for p in private.iterdir()) == ["keytab"]


def test_the_hdfs_adapter_takes_credentials_as_named_options(conf_dir):
    """hdfs:// URLs get lastlayer's adapter: credentials and the configuration folder are its own
    options, the rest Hadoop keys; each set of options is its own (cached) filesystem."""
    hadoop_fs.register()  # (a login's storage options and storage.url_to_fs of an hdfs:// URL do)
    assert fsspec.get_filesystem_class("hdfs") is hadoop_fs.HdfsFileSystem
    assert fsspec.get_filesystem_class("viewfs") is hadoop_fs.ViewfsFileSystem
    one = {"kerberos_principal": "a@LOCAL", "kerberos_cache": "FILE:/a", "hadoop_conf_dir": str(conf_dir)}
    other = {**one, "kerberos_principal": "b@LOCAL", "kerberos_cache": "FILE:/b", "dfs.replication": "1"}
    fs_a, path = storage.url_to_fs("hdfs://127.0.0.1:1/x/y", {"hdfs": one, "webhdfs": {"kerberos": True}})
    fs_b, _ = storage.url_to_fs("hdfs://127.0.0.1:1/x/y", {"hdfs": other})
    assert path == "/x/y" and isinstance(fs_a, hadoop_fs.HdfsFileSystem)
    assert one.items() <= fs_a.storage_options.items() and fs_b is not fs_a
    assert storage.url_to_fs("hdfs://127.0.0.1:1/z", {"hdfs": one})[0] is fs_a


def test_storage_options_grouped_by_protocol_reach_only_their_urls(tmp_path):
    options = {"hdfs": {"kerberos_principal": "a@LOCAL"}, "webhdfs": {"kerberos": True}, "auto_mkdir": True}
    assert storage.options_for("hdfs://nn/x", options) == {
        "kerberos_principal": "a@LOCAL",
        "auto_mkdir": True,
    }
    assert storage.options_for("webhdfs://nn/x", options) == {"kerberos": True, "auto_mkdir": True}
    assert storage.options_for(str(tmp_path), options) == {"auto_mkdir": True}
    assert storage.options_for("http://host/x", options) == {"auto_mkdir": True}
    assert storage.options_for("simplecache::hdfs://nn/x", options) == options  # fsspec sorts chains
    storage.write_atomic(str(tmp_path / "a" / "b.txt"), b"ok", options)  # local paths ignore the groups
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"ok"


def test_the_command_line_exports_only_krb5_config_and_restores_the_environment(
    tmp_path, conf_dir, monkeypatch
):
    for key in ("KRB5_CONFIG", "KRB5CCNAME", "HADOOP_CONF_DIR"):
        monkeypatch.delenv(key, raising=False)
    ns = argparse.Namespace(**{f.name: fields.default(f) for f in dataclasses.fields(ClusterConfig)})
    with cluster.connect(ns) as hadoop:
        assert hadoop is None  # no flag, no ticket cache: every client keeps its defaults
    krb5 = tmp_path / "krb5.conf"
    krb5.write_text("[libdefaults]\n default_realm = LOCAL\n")
    ns.krb5_conf, ns.hadoop_conf_dir = str(krb5), str(conf_dir)
    before = dict(os.environ)
    with cluster.connect(ns) as hadoop:
        assert hadoop is not None and hadoop.conf_dir == str(conf_dir)
        assert {k: v for k, v in os.environ.items() if before.get(k) != v} == {"KRB5_CONFIG": str(krb5)}
        assert cluster.storage_options(hadoop) == {
            "hdfs": {"hadoop_conf_dir": str(conf_dir)},
            "viewfs": {"hadoop_conf_dir": str(conf_dir)},
        }
    assert dict(os.environ) == before
