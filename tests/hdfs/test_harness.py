"""Smoke tests of the real Kerberized HDFS (MIT KDC + secure MiniDFSCluster, realm LOCAL).

They follow the walkthrough: the superuser ``hdfs`` (principal hdfs/localhost@LOCAL) creates
/tensorflow and gives it to ``tensorflow``; tensorflow@LOCAL writes there, alice@LOCAL may not, a
client without a ticket is refused, and Hadoop maps principals with the five auth_to_local rules.
Clients are hdfs-native (RPC) and fsspec (``hdfs://`` via hdfs-native, ``webhdfs`` via SPNEGO), each
reading HADOOP_CONF_DIR / KRB5_CONFIG / KRB5CCNAME from os.environ (set per test by ``as_user``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request

import fsspec
import hdfs_native
import pytest

TF_DIR = "/tensorflow"


def client() -> hdfs_native.Client:
    """A new hdfs-native client for the identity now in os.environ (fs.defaultFS from HADOOP_CONF_DIR)."""
    return hdfs_native.Client(config_dir=os.environ["HADOOP_CONF_DIR"])


def write(c: hdfs_native.Client, path: str, data: bytes) -> None:
    with c.create(path) as w:
        w.write(data)


def read(c: hdfs_native.Client, path: str) -> bytes:
    with c.read(path) as r:
        return r.read()


@pytest.fixture
def tensorflow_dir(secure_hdfs, as_user) -> str:
    """/tensorflow, created by the superuser and owned by tensorflow:tensorflow (idempotent)."""
    as_user("hdfs")
    c = client()
    c.mkdirs(TF_DIR, create_parent=True)
    c.set_owner(TF_DIR, "tensorflow", "tensorflow")
    return TF_DIR


def test_superuser_creates_tensorflow_dir(secure_hdfs, as_user):
    env = as_user("hdfs")
    assert env["HADOOP_CONF_DIR"] == str(secure_hdfs.conf_dir)
    c = client()
    c.mkdirs(TF_DIR, create_parent=True)
    c.set_owner(TF_DIR, "tensorflow", "tensorflow")
    info = c.get_file_info(TF_DIR)
    assert info.isdir
    assert (info.owner, info.group) == ("tensorflow", "tensorflow")
    assert {s.path: s.owner for s in c.list_status("/")}[TF_DIR] == "tensorflow"


def test_tensorflow_writes_and_reads(tensorflow_dir, as_user):
    as_user("tensorflow")
    c = client()
    data = secrets.token_bytes(3 * 1024 * 1024 + 17)  # crosses packet boundaries: real DataNode SASL
    path = f"{tensorflow_dir}/poets-{secrets.token_hex(4)}.bin"
    write(c, path, data)
    assert read(c, path) == data
    info = c.get_file_info(path)
    assert info.owner == "tensorflow"
    assert info.group == "tensorflow"  # inherited from /tensorflow
    assert info.length == len(data)


def test_fsspec_hdfs_url_as_tensorflow(secure_hdfs, tensorflow_dir, as_user):
    """The way lastlayer reaches HDFS: fsspec URLs, implemented by hdfs-native."""
    as_user("tensorflow")
    url = f"{secure_hdfs.namenode_url}{tensorflow_dir}/fsspec-{secrets.token_hex(4)}.txt"
    # A new filesystem instance: fsspec caches instances, and the Kerberos identity is bound to one.
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    with fs.open(path, "wb") as f:
        f.write(b"flower photos")
    assert fs.cat_file(path) == b"flower photos"
    assert fs.info(path)["owner"] == "tensorflow"
    # hdfs:/// takes the NameNode from fs.defaultFS in HADOOP_CONF_DIR.
    fs2, _ = fsspec.core.url_to_fs("hdfs:///", skip_instance_cache=True)
    assert path in fs2.ls(tensorflow_dir, detail=False)


def test_client_without_ticket_is_refused(secure_hdfs, as_user):
    as_user(None)
    with pytest.raises(Exception, match=r"(?i)gss|kerberos|credential|authenticat") as exc:
        list(client().list_status("/"))
    assert "GSS_S_NO_CRED" in str(exc.value) or "Kerberos" in str(exc.value)


@pytest.mark.parametrize("query", ["op=LISTSTATUS", "op=LISTSTATUS&user.name=tensorflow"])
def test_webhdfs_without_spnego_is_refused(secure_hdfs, query):
    """The server side of the refusal: WebHDFS demands SPNEGO (pseudo auth `user.name=` does not count)."""
    url = f"http://127.0.0.1:{secure_hdfs.http_port}/webhdfs/v1/?{query}"
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url, timeout=30)
    assert exc.value.code == 401
    assert exc.value.headers.get("WWW-Authenticate", "").startswith("Negotiate")


def test_alice_cannot_write_into_tensorflow_dir(tensorflow_dir, as_user):
    as_user("alice")
    c = client()
    with pytest.raises(Exception, match=r"AccessControlException|Permission denied") as exc:
        write(c, f"{tensorflow_dir}/alice-{secrets.token_hex(4)}.txt", b"nope")
    assert "user=alice" in str(exc.value)
    # Listing is allowed (drwxr-xr-x): alice is authenticated, just not the owner.
    assert isinstance([s.path for s in c.list_status(tensorflow_dir)], list)


@pytest.mark.parametrize(
    ("principal", "short"),
    [
        ("tensorflow@LOCAL", "tensorflow"),
        ("bob@LOCAL", "bob"),
        ("alice@LOCAL", "alice"),
        ("hdfs/localhost@LOCAL", "hdfs"),
        ("hdfs@LOCAL", "hdfs"),
    ],
)
def test_map_principal(secure_hdfs, principal, short):
    assert secure_hdfs.map_principal(principal) == short


@pytest.mark.parametrize("principal", ["carol@LOCAL", "HTTP/localhost@LOCAL", "tensorflow@OTHER"])
def test_map_principal_without_rule(secure_hdfs, securehdfs, principal):
    """The five rules have no DEFAULT: anything else is refused by Hadoop's `hadoop` mechanism."""
    with pytest.raises(securehdfs.MappingError, match="No rules applied"):
        secure_hdfs.map_principal(principal)


def test_principals_and_keytabs(secure_hdfs):
    assert secure_hdfs.principal("hdfs") == "hdfs/localhost@LOCAL"
    assert secure_hdfs.principal("HTTP") == "HTTP/localhost@LOCAL"
    assert secure_hdfs.principal("tensorflow") == "tensorflow@LOCAL"
    assert secure_hdfs.keytab("hdfs") == secure_hdfs.keytab("HTTP")
    for user in ("hdfs", "tensorflow", "alice", "bob"):
        assert secure_hdfs.keytab(user).stat().st_mode & 0o777 == 0o600
    assert secure_hdfs.namenode_url.startswith("hdfs://127.0.0.1:")
    assert secure_hdfs.webhdfs_url == f"webhdfs://localhost:{secure_hdfs.http_port}"


def test_webhdfs_spnego_with_fsspec(secure_hdfs, tensorflow_dir, as_user):
    pytest.importorskip(
        "requests_kerberos",
        reason="fsspec webhdfs kerberos=True needs requests-kerberos (pyspnego + gssapi: libkrb5-dev)",
    )
    as_user("tensorflow")
    fs = fsspec.filesystem(
        "webhdfs", host="localhost", port=secure_hdfs.http_port, kerberos=True, skip_instance_cache=True
    )
    path = f"{tensorflow_dir}/webhdfs-{secrets.token_hex(4)}.txt"
    with fs.open(path, "wb") as f:  # NameNode (SPNEGO) redirects to the DataNode (delegation token)
        f.write(b"via WebHDFS + SPNEGO")
    assert fs.cat_file(path) == b"via WebHDFS + SPNEGO"
    assert fs.info(path)["owner"] == "tensorflow"


def test_webhdfs_spnego_with_curl(secure_hdfs, as_user):
    """SPNEGO without Python extras: curl --negotiate (Debian's curl has GSS-API)."""
    curl = shutil.which("curl")
    if curl is None or "SPNEGO" not in subprocess.run([curl, "-V"], capture_output=True, text=True).stdout:
        pytest.skip("no curl with SPNEGO")
    env = as_user("bob")
    url = f"http://localhost:{secure_hdfs.http_port}/webhdfs/v1/?op=GETHOMEDIRECTORY"
    out = subprocess.run(
        [curl, "-sS", "--fail", "--negotiate", "-u", ":", url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    assert '"/user/bob"' in out.stdout  # the NameNode mapped bob@LOCAL to bob


def test_namenode_restart_then_client_works(secure_hdfs, tensorflow_dir, as_user):
    as_user("tensorflow")
    c = client()
    path = f"{tensorflow_dir}/before-restart-{secrets.token_hex(4)}.txt"
    write(c, path, b"persisted across a NameNode restart")
    url = secure_hdfs.namenode_url
    secure_hdfs.restart_namenode(timeout=120)
    assert secure_hdfs.namenode_url == url  # same ports
    # The client made before the restart works again, and so does a new one.
    assert read(c, path) == b"persisted across a NameNode restart"
    c2 = client()
    write(c2, f"{tensorflow_dir}/after-restart.txt", b"ok")
    assert c2.get_file_info(path).owner == "tensorflow"


def test_kdc_down_then_up(secure_hdfs, securehdfs, tensorflow_dir, as_user):
    as_user("tensorflow")  # a TGT, but no service ticket for hdfs/localhost yet
    secure_hdfs.kdc_stop()
    try:
        with pytest.raises(Exception, match=r"(?i)kdc|contact|gss"):
            list(client().list_status(tensorflow_dir))
        with pytest.raises(securehdfs.HarnessError, match=r"(?i)kinit"):
            secure_hdfs.env("alice")
    finally:
        secure_hdfs.kdc_start()
    assert client().get_file_info(tensorflow_dir).owner == "tensorflow"
