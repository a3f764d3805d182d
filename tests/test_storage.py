"""Atomic writes: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from lastlayer import storage
from lastlayer.errors import DataError, StorageError


def test_write_atomic_replaces_and_creates_parents(tmp_path: Path):
    target = tmp_path / "a" / "b" / "out.txt"
    storage.write_atomic(str(target), b"one")
    storage.write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_bytes(b"old")
    with pytest.raises(StorageError, match="cannot write"), storage.atomic_path(str(target)) as (fs, tmp):
        fs.pipe_file(tmp, b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_urls_and_missing_files(tmp_path: Path):
    url = f"file://{tmp_path}/x.bin"
    storage.write_atomic(url, b"data")
    assert storage.read_bytes(url) == b"data" and storage.exists(url)
    assert storage.join("hdfs://nn:8020/base/", "a", "b.jpg") == "hdfs://nn:8020/base/a/b.jpg"
    with pytest.raises(StorageError, match="check that the path exists"):
        storage.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="cannot open"):
        storage.read_bytes("nosuchscheme://x/y")


def test_an_expired_delegation_token_names_the_setting_to_raise():
    hadoop = RuntimeError(
        'FatalRPCError("org.apache.hadoop.security.token.SecretManager$InvalidToken", "Token has expired, '
        'current time: 2026-12-07 18:55:21,490+0000 expected renewal time: 2026-12-07 18:54:30,597+0000")'
    )
    message = str(storage.describe(hadoop, "hdfs:///photos/a.jpg", "read"))
    assert message.startswith("cannot read hdfs:///photos/a.jpg: its HDFS delegation token has expired")
    assert "dfs.namenode.delegation.token.renew-interval" in message
    assert "\n" not in message


def test_open_regular_streams_a_regular_file_and_refuses_to_read_past_its_limit(tmp_path: Path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"x" * 100)
    with storage.open_regular(str(path), max_bytes=100) as stream:
        assert stream.read() == b"x" * 100
    too_large = pytest.raises(DataError, match="at least 100 bytes, more than the 99")
    with storage.open_regular(str(path), max_bytes=99) as stream, too_large:
        stream.read()
    memory = "memory://wt21/f.txt"
    storage.write_atomic(memory, b"y" * 10)
    with storage.open_regular(memory, max_bytes=10) as stream:
        assert stream.read() == b"y" * 10
    with pytest.raises(StorageError, match="cannot read"), storage.open_regular(str(tmp_path / "missing")):
        pass
