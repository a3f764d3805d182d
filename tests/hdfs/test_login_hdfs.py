"""Two HadoopLogins in one process, on the real KDC and secure HDFS: each writes as itself, at the
same time, neither disturbs the other, and no library call touches os.environ."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import ENV_KEYS, as_superuser, make_dataset
from lastlayer import storage
from lastlayer.errors import StorageError
from lastlayer.hadoop import ClusterConfig, HadoopLogin
from lastlayer.transfer import upload

USERS = ("tensorflow", "bob")


@pytest.fixture(scope="module")
def home_dirs(secure_hdfs) -> None:
    """/logins/tensorflow and /logins/bob, each owned by its user (made by the superuser)."""
    as_superuser(
        secure_hdfs,
        "for u in ('tensorflow', 'bob'):\n"
        "    fs.makedirs(f'/logins/{u}', exist_ok=True)\n"
        "    fs.client.set_owner(f'/logins/{u}', u, u)\n",
    )


@pytest.fixture
def library_process(secure_hdfs, monkeypatch) -> None:
    """The environment of a Python process a library user starts: KRB5_CONFIG names the cluster's
    krb5.conf (MIT Kerberos reads it from there only); no ticket cache, no HADOOP_CONF_DIR."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KRB5_CONFIG", str(secure_hdfs.krb5_conf))


def config(cluster, user: str) -> ClusterConfig:
    return ClusterConfig(
        principal=cluster.principal(user),
        keytab=str(cluster.keytab(user)),
        krb5_conf=str(cluster.krb5_conf),
        hadoop_conf_dir=str(cluster.conf_dir),
    )


def owner(login: HadoopLogin, url: str) -> str:
    fs, path = storage.url_to_fs(url, login.storage_options())
    return str(fs.info(path)["owner"])


def test_two_logins_write_as_themselves_at_the_same_time(secure_hdfs, home_dirs, library_process):
    before = dict(os.environ)
    with HadoopLogin(config(secure_hdfs, "tensorflow")) as tensorflow:
        with HadoopLogin(config(secure_hdfs, "bob")) as bob:
            logins = {"tensorflow": tensorflow, "bob": bob}
            assert dict(os.environ) == before

            def write(user: str, i: int) -> str:
                url = f"hdfs:///logins/{user}/part-{i}.bin"
                storage.write_atomic(url, f"{user} {i}".encode() * 10_000, logins[user].storage_options())
                return url

            with ThreadPoolExecutor(4) as pool:  # interleaved: both identities in use at once
                urls = list(
                    pool.map(
                        write, [u for _ in range(4) for u in USERS], [i for i in range(4) for _ in USERS]
                    )
                )
            for url in urls:
                user = url.split("/")[4]
                assert owner(logins[user], url) == user
                assert storage.read_bytes(url, bob.storage_options()).startswith(user.encode())
            with pytest.raises(StorageError, match=r"Permission denied: user=bob, access=WRITE"):
                storage.write_atomic("hdfs:///logins/tensorflow/from-bob.txt", b"no", bob.storage_options())
            bob_cache = Path(bob.ccache.removeprefix("FILE:"))
        assert not bob_cache.exists()  # bob's login ended: its cache is gone ...
        storage.write_atomic("hdfs:///logins/tensorflow/after-bob.txt", b"ok", tensorflow.storage_options())
        assert (
            owner(tensorflow, "hdfs:///logins/tensorflow/after-bob.txt") == "tensorflow"
        )  # ... not tensorflow's
    assert dict(os.environ) == before


def test_a_library_upload_leaves_os_environ_unchanged(secure_hdfs, home_dirs, library_process, tmp_path):
    photos = make_dataset(tmp_path / "photos", per_class=2)
    before = dict(os.environ)
    with HadoopLogin(config(secure_hdfs, "bob")) as bob:
        report = upload(
            str(photos), "hdfs:///logins/bob/photos", threads=2, storage_options=bob.storage_options()
        )
        assert dict(os.environ) == before
    assert dict(os.environ) == before
    assert report.files == 6
    for key in ("KRB5CCNAME", "HADOOP_CONF_DIR"):
        assert key not in os.environ
