"""`lastlayer upload`: parallel, resumable, verified copies (local and memory:// here; HDFS in tests/hdfs)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from helpers import make_dataset
from lastlayer.cli import main
from lastlayer.errors import StorageError
from lastlayer.transfer import MOST_IN_FLIGHT, START_IN_FLIGHT, Window, upload


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


# -- many files in flight -------------------------------------------------------------------------


def simulate(window: Window, latency: float, capacity: float, files: int = 5000) -> list[int]:
    """Feed ``window`` the finishing times of a storage where ``c`` files in flight finish at
    ``min(c / latency, capacity)`` files/s (Little's law, up to a capacity); the limits it took."""
    now, limits = 0.0, [window.limit]
    for _ in range(files):
        now += 1 / min(window.limit / latency, capacity)
        window.finished(now)
        if window.limit != limits[-1]:
            limits.append(window.limit)
    return limits


def test_the_window_doubles_while_the_rate_rises_then_keeps_the_best():
    window = Window()
    limits = simulate(window, latency=0.1, capacity=500)  # 8: 80/s, 16: 160/s, 32: 320/s, 64+: 500/s
    assert limits == [START_IN_FLIGHT, 16, 32, 64, 128, 64]
    assert not window.adapting and window.limit == 64


def test_the_window_stops_at_its_most_when_the_storage_never_saturates():
    window = Window()
    assert simulate(window, latency=0.5, capacity=float("inf"))[-1] == MOST_IN_FLIGHT
    assert not window.adapting


def test_a_fixed_window_never_changes():
    window = Window(fixed=3)
    assert simulate(window, latency=0.1, capacity=500) == [3] and not window.adapting


def test_files_in_flight_and_a_failure_that_does_not_stop_the_others(tmp_path: Path):
    src = make_dataset(tmp_path / "src", per_class=10)
    dst = tmp_path / "dst"
    (dst / "blue_squares" / "img_003.jpg").mkdir(parents=True)  # a folder where a file must go
    with pytest.raises(StorageError, match=r"img_003\.jpg: it is an existing folder"):
        upload(str(src), str(dst), threads=5)
    copied = {p.relative_to(dst) for p in dst.rglob("*.jpg") if p.is_file()}
    assert 0 < len(copied) < 30  # the files in flight finished; no new ones started after the failure
    assert not [p for p in dst.rglob(".*") if p.is_file()]  # no temporary file left behind
    (dst / "blue_squares" / "img_003.jpg").rmdir()
    report = upload(str(src), str(dst), threads=5)
    assert (report.copied, report.skipped, report.in_flight) == (30 - len(copied), len(copied), 5)
    assert all((dst / p).read_bytes() == (src / p).read_bytes() for p in copied)
