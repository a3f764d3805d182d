"""`lastlayer upload`: parallel, resumable, verified copies (local and memory:// here; HDFS in tests/hdfs)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
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


def simulate(
    window: Window, rate: Callable[[int, float], float], files: int = 20000
) -> tuple[list[int], Counter[int]]:
    """Feed ``window`` the finishing times of a storage that finishes ``rate(in flight, now)`` files/s;
    the limits it took, and how many files finished at each."""
    now, limits, at = 0.0, [window.limit], Counter[int]()
    for _ in range(files):
        now += 1 / rate(window.limit, now)
        at[window.limit] += 1
        window.finished(now)
        if window.limit != limits[-1]:
            limits.append(window.limit)
    return limits, at


def little(latency: float, capacity: float) -> Callable[[int, float], float]:
    """``c`` files in flight finish at ``min(c / latency, capacity)`` files/s (Little's law, capped)."""
    return lambda c, now: min(c / latency, capacity)


def test_the_window_doubles_while_the_rate_rises_and_holds_the_best():
    window = Window()
    limits, at = simulate(window, little(0.1, 500))  # 8: 80/s, 16: 160/s, 32: 320/s, 64+: 500/s
    assert limits[:6] == [START_IN_FLIGHT, 16, 32, 64, 128, 64]
    assert at.most_common(1)[0][0] == 64 and set(limits) == {8, 16, 32, 64, 128}  # 128: tried again


def test_the_window_stops_at_its_most_when_the_storage_never_saturates():
    window = Window()
    limits, at = simulate(window, little(0.5, float("inf")))
    assert limits[-1] == MOST_IN_FLIGHT and at.most_common(1)[0][0] == MOST_IN_FLIGHT


def test_one_unlucky_measurement_does_not_fix_the_window():
    """The machine is busy for the first 3 s (30 files/s whatever is in flight), then the storage
    answers as Little's law says: the window finds the knee afterwards."""
    window = Window()
    limits, at = simulate(window, lambda c, now: 30.0 if now < 3 else min(c / 0.1, 500))
    assert limits[:2] == [START_IN_FLIGHT, 16] and 8 in limits[2:]  # the first doubling was undone ...
    assert at.most_common(1)[0][0] == 64  # ... and tried again once the machine was free


def test_a_fixed_window_never_changes():
    window = Window(fixed=3)
    assert simulate(window, little(0.1, 500))[0] == [3] and not window.adapting


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
