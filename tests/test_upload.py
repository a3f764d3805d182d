"""`lastlayer upload`: parallel, resumable, verified copies (local and memory:// here; HDFS in tests/hdfs)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from helpers import make_dataset
from lastlayer.cli import main
from lastlayer.errors import StorageError
from lastlayer.transfer import upload


def test_upload_copies_then_resumes_only_what_is_missing(tmp_path: Path):
    src = make_dataset(tmp_path / "src", per_class=5)
    dst = tmp_path / "dst"
    first = upload(str(src), str(dst), threads=4)
    assert (first.files, first.copied, first.skipped) == (15, 15, 0)
    assert sorted(p.relative_to(dst) for p in dst.rglob("*.jpg")) == sorted(
        p.relative_to(src) for p in src.rglob("*.jpg")
    )
    # an interruption: one file cut short, one missing, a stray temporary left behind
    victim = dst / "blue_squares" / "img_001.jpg"
    victim.write_bytes(victim.read_bytes()[:100])
    (dst / "Red Circles" / "img_002.jpg").unlink()
    (dst / "Red Circles" / "._lastlayer_tmp_x_img_002.jpg").write_bytes(b"partial")
    again = upload(str(src), str(dst))
    assert (again.copied, again.skipped) == (2, 13)
    assert victim.read_bytes() == (src / "blue_squares" / "img_001.jpg").read_bytes()
    assert upload(str(src), str(dst)).copied == 0


def test_upload_to_another_filesystem_and_cli(tmp_path: Path, capsys):
    src = make_dataset(tmp_path / "src", per_class=2)
    assert main(["upload", str(src), "memory://lastlayer-upload-test/photos", "--threads=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["copied"] == 6 and report["skipped"] == 0
    fs = fsspec.filesystem("memory")
    assert len(fs.find("/lastlayer-upload-test/photos")) == 6


def test_upload_errors(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="nothing to upload"):
        upload(str(tmp_path / "empty"), str(tmp_path / "dst"))
    assert main(["upload", str(tmp_path / "empty")]) == 2
    assert "upload needs DST" in capsys.readouterr().err
