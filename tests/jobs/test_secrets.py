"""The local secret store: private files, DC/OS base64 names, helpful misses, no path traversal."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from lastlayer.errors import UsageError
from lastlayer.jobs import secret_store

KEYTAB = bytes(range(256)) * 3  # binary, like a keytab


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(secret_store.ENV_VAR, raising=False)
    return tmp_path / "store"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_then_read_creates_private_folders_and_files(store: Path):
    path = secret_store.write_secret("hdfs/site/password", b"s3cret\n", store)
    assert path == store / "hdfs" / "site" / "password"
    assert secret_store.read_secret("hdfs/site/password", store) == b"s3cret\n"
    assert mode_of(path) == 0o600
    assert [mode_of(p) for p in (store, store / "hdfs", store / "hdfs" / "site")] == [0o700] * 3
    secret_store.write_secret("hdfs/site/password", b"other", store)  # replaced atomically
    assert secret_store.read_secret("hdfs/site/password", store) == b"other"
    assert sorted(p.name for p in path.parent.iterdir()) == ["password"]  # no temporary left behind
    assert secret_store.list_secrets(store) == ["hdfs/site/password"]


def test_store_location_argument_then_env_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(secret_store.ENV_VAR, raising=False)
    assert secret_store.store_dir() == tmp_path / "home" / ".lastlayer" / "secrets"
    secret_store.write_secret("a", b"home")
    monkeypatch.setenv(secret_store.ENV_VAR, str(tmp_path / "env"))
    assert secret_store.store_dir() == tmp_path / "env"
    secret_store.write_secret("a", b"env")
    assert secret_store.read_secret("a") == b"env"
    assert secret_store.read_secret("a", tmp_path / "home" / ".lastlayer" / "secrets") == b"home"
    assert secret_store.read_secret("a", str(tmp_path / "env")) == b"env"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660, 0o604, 0o610, 0o601, 0o700 | 0o004])
def test_files_open_to_group_or_others_are_refused(store: Path, mode: int):
    path = secret_store.write_secret("keytab", KEYTAB, store)
    path.chmod(mode)
    with pytest.raises(UsageError) as info:
        secret_store.read_secret("keytab", store)
    message = str(info.value)
    assert f"has mode {mode:04o}, open to group or others; run chmod 600 {path}" in message
    assert "\n" not in message


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_private_files_are_accepted(store: Path, mode: int):
    path = secret_store.write_secret("keytab", KEYTAB, store)
    path.chmod(mode)
    assert secret_store.read_secret("keytab", store) == KEYTAB


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_files_of_another_user_are_refused(store: Path):
    path = secret_store.write_secret("keytab", KEYTAB, store)
    os.chown(path, 12345, -1)
    with pytest.raises(UsageError, match=r"belongs to uid 12345, not to the user reading it \(uid 0\)"):
        secret_store.read_secret("keytab", store)


def test_only_regular_files_are_secrets(store: Path):
    secret_store.write_secret("x", b"1", store)
    (store / "folder").mkdir(mode=0o700)
    with pytest.raises(UsageError, match="is not a regular file"):
        secret_store.read_secret("folder", store)
    os.mkfifo(store / "fifo", 0o600)  # must not block
    with pytest.raises(UsageError, match="is not a regular file"):
        secret_store.read_secret("fifo", store)


def test_dcos_base64_names_are_decoded(store: Path):
    encoded = base64.encodebytes(KEYTAB)  # wrapped at 76 columns, as `base64` writes it
    assert b"\n" in encoded.strip()
    path = secret_store.write_secret("__dcos_base64__tensorflow_keytab", encoded, store)
    assert path.read_bytes() == encoded
    assert secret_store.read_secret("__dcos_base64__tensorflow_keytab", store) == KEYTAB
    # base64_encode stores the encoding; nested names use their last part for the prefix.
    path = secret_store.write_secret("hdfs/__dcos_base64__keytab", KEYTAB, store, base64_encode=True)
    assert path.read_bytes() == base64.b64encode(KEYTAB)
    assert secret_store.read_secret("hdfs/__dcos_base64__keytab", store) == KEYTAB
    # Without the prefix the bytes come back as stored.
    secret_store.write_secret("plain", encoded, store)
    assert secret_store.read_secret("plain", store) == encoded


def test_invalid_base64_is_a_clear_error_without_the_value(store: Path):
    path = store / "__dcos_base64__broken"
    store.mkdir(mode=0o700)
    path.write_bytes(b"not*base64!TOPSECRET")
    path.chmod(0o600)
    with pytest.raises(UsageError) as info:
        secret_store.read_secret("__dcos_base64__broken", store)
    message = str(info.value)
    assert "its name starts with __dcos_base64__ so" in message and "must hold base64 text" in message
    assert "TOPSECRET" not in message


def test_write_checks_that_name_and_base64_agree(store: Path):
    with pytest.raises(UsageError, match="needs a name starting with __dcos_base64__"):
        secret_store.write_secret("keytab", KEYTAB, store, base64_encode=True)
    with pytest.raises(UsageError, match="pass base64_encode=True to encode it"):
        secret_store.write_secret("__dcos_base64__keytab", KEYTAB, store)
    assert not store.exists()


def test_a_missing_secret_lists_the_names_the_store_holds(store: Path):
    secret_store.write_secret("__dcos_base64__hdfs_keytab", base64.b64encode(b"VALUE-ONE"), store)
    secret_store.write_secret("team/token", b"VALUE-TWO", store)
    with pytest.raises(UsageError) as info:
        secret_store.read_secret("__dcos_base64__tensorflow_keytab", store)
    message = str(info.value)
    assert message.startswith(f"secret '__dcos_base64__tensorflow_keytab': no file {store}/")
    assert "(it holds: __dcos_base64__hdfs_keytab, team/token)" in message
    assert "add it there (chmod 600), or pass the store that holds it" in message
    assert "VALUE" not in message and base64.b64encode(b"VALUE-ONE").decode() not in message
    with pytest.raises(UsageError, match=r"it holds: __dcos_base64__hdfs_keytab, team/token"):
        secret_store.read_secret("team/token/deeper", store)  # a file where a folder is expected
    with pytest.raises(
        UsageError, match=r"cannot create the secret folder .*team/token/deeper: Not a directory"
    ):
        secret_store.write_secret("team/token/deeper/x", b"1", store)


def test_a_missing_store_says_so(store: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(secret_store.ENV_VAR, str(store))
    with pytest.raises(
        UsageError, match=r"the secret store .*store does not exist.* or set LASTLAYER_SECRETS_DIR"
    ):
        secret_store.read_secret("keytab")
    assert secret_store.list_secrets() == []


@pytest.mark.parametrize(
    "name",
    ["../outside", "a/../../outside", "/etc/passwd", "~/x", "a//b", "./a", "a/.", "", " ", "a\\b", "a\0b"],
)
def test_names_that_could_leave_the_store_are_refused(store: Path, name: str):
    outside = store.parent / "outside"
    outside.write_bytes(b"not yours")
    outside.chmod(0o600)
    with pytest.raises(UsageError, match=r"secret name|a secret name must be"):
        secret_store.read_secret(name, store)
    with pytest.raises(UsageError, match=r"secret name|a secret name must be"):
        secret_store.write_secret(name, b"x", store)
    assert outside.read_bytes() == b"not yours"
    assert not store.exists()
