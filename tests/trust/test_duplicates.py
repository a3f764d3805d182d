"""Near-duplicates (lastlayer.trust.duplicates): the blocked search against brute force, the groups,
and a run that reports a photo copied into the test split and into another class."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from helpers import retrain_summary
from lastlayer.dataset import TESTING, TRAINING, which_set
from lastlayer.trust import duplicates


def test_the_blocked_search_finds_every_pair_brute_force_finds(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (400, 24)).astype(np.float32) * np.linspace(3, 0.1, 24)
    x[300:330] = x[:30] + rng.normal(0, 0.05, (30, 24))  # near-copies
    x[330] = x[0]  # an exact copy: a group of three with rows 0 and 300
    u = duplicates.unit_rows(x)
    monkeypatch.setattr(duplicates, "BLOCK_BYTES", 4 * 400 * 7)  # blocks of 7 rows
    monkeypatch.setattr(duplicates, "DIRECT_ROWS", 100)  # pruned by the projection
    found = duplicates.pairs(u, 0.97, components=3)
    cosine = u @ u.T
    i, j = np.nonzero(np.triu(cosine >= 0.97, 1))
    assert sorted(map(tuple, found.tolist())) == sorted(zip(i.tolist(), j.tolist(), strict=True))
    assert len(found) >= 30
    assert [0, 300, 330] in [g.tolist() for g in duplicates.groups(found)]


def test_groups_join_pairs_transitively_largest_first():
    linked = np.array([[5, 9], [1, 2], [9, 12], [2, 3], [3, 1], [7, 8]])
    assert [g.tolist() for g in duplicates.groups(linked)] == [[1, 2, 3], [5, 9, 12], [7, 8]]
    assert duplicates.groups(np.zeros((0, 2), np.int64)) == []


def _name_in(split: str, folder: str) -> str:
    """A file name that retrain's split hash puts in ``split`` (10% test, 10% validation)."""
    for k in range(10000):
        if which_set(f"{folder}/copy_{k}.jpg", 10, 10) == split:
            return f"copy_{k}.jpg"
    raise AssertionError("no such name")


def test_a_run_reports_a_leak_and_a_conflict_and_a_flag_turns_it_off(tmp_path, shapes_dir, model_dir):
    images = tmp_path / "images"
    shutil.copytree(shapes_dir, images)
    source = next(p for p in sorted((images / "blue_squares").iterdir()) if which_set(
        f"blue_squares/{p.name}", 10, 10) == TRAINING)  # fmt: skip
    leaked = _name_in(TESTING, "blue_squares")
    Image.open(source).resize((100, 100)).save(images / "blue_squares" / leaked, quality=90)
    shutil.copyfile(source, images / "green-stripes" / "copy.jpg")  # the same bytes, another class

    def run(name: str, **training) -> dict:
        return retrain_summary(images, tmp_path, model_dir, name, 20, **training)

    found = run("on")["trust"]["duplicates"]
    paths = {f"blue_squares/{source.name}", f"blue_squares/{leaked}", "green-stripes/copy.jpg"}
    group = next(g for g in found["listed"] if {m["path"] for m in g["members"]} & paths)
    assert {m["path"] for m in group["members"]} >= paths and group["leak"] and group["conflict"]
    assert found["leaks"] >= 1 and found["conflicts"] >= 1 and found["threshold"] == duplicates.THRESHOLD
    assert "green-stripes/copy.jpg" in (tmp_path / "on" / "g.report.html").read_text()
    assert run("off", find_duplicates=False)["trust"]["duplicates"] is None


def test_a_small_set_is_compared_on_all_features_directly():
    rng = np.random.default_rng(1)
    u = duplicates.unit_rows(rng.normal(0, 1, (50, 8)).astype(np.float32))
    u[49] = u[3]
    assert duplicates.pairs(u, 0.999).tolist() == [[3, 49]]
