"""The Parquet bottleneck cache: few files, content-addressed, damage detected."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lastlayer.cache import COMPACT_ABOVE, FeatureStore, Row


def rows(n: int, start: int = 0, dim: int = 4) -> list[Row]:
    return [
        Row(f"{i:064x}", 0, f"c/{i}.jpg", f"10:{i}", np.full(dim, i, np.float32), None)
        for i in range(start, start + n)
    ]


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def test_rows_survive_a_reload_in_one_file(tmp_path: Path):
    store = FeatureStore(str(tmp_path), 4)
    store.add(rows(1000))
    store.add([Row("f" * 64, 0, "c/bad.jpg", "1:1", None, "cannot decode: truncated")])
    store.flush()
    assert len(parts(tmp_path)) == 1
    again = FeatureStore(str(tmp_path), 4)
    assert len(again) == 1001
    assert np.array_equal(again.features[again.row(f"{7:064x}")], np.full(4, 7, np.float32))
    assert again.content_for("c/7.jpg", "10:7") == f"{7:064x}"
    assert again.content_for("c/7.jpg", "11:7") is None
    assert again.error("f" * 64) == "cannot decode: truncated" and again.has("f" * 64)


def test_flush_rows_bounds_memory_and_compaction_merges(tmp_path: Path):
    store = FeatureStore(str(tmp_path), 4, flush_rows=10)
    for k in range(COMPACT_ABOVE + 2):
        store.add(rows(10, start=10 * k))
    assert len(parts(tmp_path)) == COMPACT_ABOVE + 2
    store.compact()
    assert len(parts(tmp_path)) == 1
    assert len(FeatureStore(str(tmp_path), 4)) == 10 * (COMPACT_ABOVE + 2)


def test_damaged_files_are_detected_removed_and_not_trusted(tmp_path: Path, caplog):
    store = FeatureStore(str(tmp_path), 4, flush_rows=5)
    store.add(rows(5))
    store.add(rows(5, start=5))
    first, second = parts(tmp_path)
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    (tmp_path / "part-not-a-hash.parquet").write_bytes(b"ignored: not our name")
    again = FeatureStore(str(tmp_path), 4)
    assert again.damaged == 1
    assert "damaged bottleneck cache file" in caplog.text
    assert not first.exists() and second.exists()
    assert len(again) == 5


def test_alias_rows_record_a_new_path_without_a_second_feature(tmp_path: Path):
    store = FeatureStore(str(tmp_path), 4)
    store.add(rows(2))
    store.add([Row(f"{1:064x}", 0, "moved/1.jpg", "10:99", None, None)])
    store.flush()
    again = FeatureStore(str(tmp_path), 4)
    assert len(again) == 2
    assert again.content_for("moved/1.jpg", "10:99") == f"{1:064x}"
