"""The image folder: labels, extensions, the stable split and the errors."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from helpers import make_dataset
from lastlayer.dataset import TESTING, TRAINING, VALIDATION, label_for, scan, which_set
from lastlayer.errors import DataError


def test_labels_follow_retrain_py():
    assert label_for("Red Circles") == "red circles"
    assert label_for("green--stripes_2") == "green stripes 2"
    assert label_for("Ästhetik Blüten") == "ästhetik blüten"
    assert label_for("цветы") == "цветы"


def test_split_is_retrain_py_hash_of_relative_path():
    # the _nohash_ suffix is ignored: both names land in the same set
    assert which_set("a/x_nohash_1.jpg", 10, 10) == which_set("a/x_nohash_2.jpg", 10, 10)
    counts = {s: 0 for s in (TRAINING, VALIDATION, TESTING)}
    for i in range(2000):
        counts[which_set(f"c/img{i}.jpg", 10, 10)] += 1
    assert 150 < counts[VALIDATION] < 250 and 150 < counts[TESTING] < 250
    assert which_set("c/img1.jpg", 0, 0) == TRAINING


def test_split_survives_a_move(tmp_path: Path):
    a = scan(str(make_dataset(tmp_path / "one", per_class=12)), 20, 20)
    b = scan(f"file://{make_dataset(tmp_path / 'deep' / 'two', per_class=12)}", 20, 20)
    assert [(f.relpath, f.split) for f in a.files] == [(f.relpath, f.split) for f in b.files]
    assert b.files[0].url.startswith("file://")


def test_extensions_case_and_counting(tmp_path: Path, caplog):
    make_dataset(tmp_path, per_class=3)
    odd = tmp_path / "Red Circles"
    (odd / "img_000.jpg").rename(odd / "UPPER.JPEG")
    (odd / "notes.txt").write_text("not an image")
    (odd / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "LICENSE.txt").write_text("top-level files are ignored")
    with caplog.at_level(logging.WARNING):
        images = scan(str(tmp_path), 10, 10)
    assert images.labels == ("red circles", "blue squares", "green stripes")  # sorted by folder name
    assert len(images.files) == 9
    assert any("UPPER.JPEG" in f.relpath for f in images.files)
    assert "less than 20 images" in caplog.text


def test_fewer_than_two_classes_is_a_clear_error(tmp_path: Path):
    make_dataset(tmp_path, per_class=2)
    for folder in ("blue_squares", "green-stripes"):
        for f in (tmp_path / folder).iterdir():
            f.unlink()
    with pytest.raises(DataError, match="only one valid folder"):
        scan(str(tmp_path), 10, 10)
    with pytest.raises(DataError, match="does not exist"):
        scan(str(tmp_path / "missing"), 10, 10)


def test_two_folders_with_one_label_are_refused(tmp_path: Path):
    make_dataset(tmp_path, per_class=2)
    (tmp_path / "Blue Squares").mkdir()
    (tmp_path / "Blue Squares" / "a.jpg").write_bytes(
        (tmp_path / "blue_squares" / "img_000.jpg").read_bytes()
    )
    with pytest.raises(DataError, match="both give the label"):
        scan(str(tmp_path), 10, 10)


def test_every_listing_finds_the_same_images_in_the_same_order(tmp_path: Path):
    data = make_dataset(tmp_path / "d", per_class=5)
    (data / "blue_squares" / "deeper" / "x").mkdir(parents=True)
    (data / "blue_squares" / "deeper" / "x" / "b.png").write_bytes(b"png")
    (data / "blue_squares" / "deeper" / "a.jpg").write_bytes(b"jpg")
    memory = fsspec.filesystem("memory")
    for path in data.rglob("*"):
        if path.is_file():
            memory.pipe_file(f"/listing/{path.relative_to(data)}", path.read_bytes())
    local, other = scan(str(data), 20, 20), scan("memory:///listing", 20, 20)  # os.walk; fsspec's walk
    assert [(f.relpath, f.label_index, f.split) for f in local.files] == [
        (f.relpath, f.label_index, f.split) for f in other.files
    ]
    assert local.files[5].relpath == "blue_squares/deeper/a.jpg" and local.files[6].relpath.endswith(
        "x/b.png"
    )
    assert local.files[-1] == list(local.files)[-1] and local.files[0].stamp.startswith(
        f"{(data / local.files[0].relpath).stat().st_size}:"
    )
    assert {s: int(n) for s, n in ((s, len(local.indices(s))) for s in (TRAINING, VALIDATION, TESTING))} == {
        s: sum(c[s] for c in local.counts().values()) for s in (TRAINING, VALIDATION, TESTING)
    }


def test_an_image_set_holds_columns_not_an_object_per_image(tmp_path: Path):
    for k in range(3):
        (tmp_path / f"class_{k}").mkdir()
        for i in range(3000):
            (tmp_path / f"class_{k}" / f"image_{i:05d}.jpg").touch()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()
    images = scan(str(tmp_path), 10, 10)
    held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - before
    tracemalloc.stop()
    assert len(images.files) == 9000 and held / 9000 < 120  # a tuple of ImageFile objects: ~350
