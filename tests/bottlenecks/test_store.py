"""The Parquet bottleneck cache: few files, content-addressed, damage detected."""

from __future__ import annotations

import hashlib
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lastlayer.bottlenecks.keys import DigestMap, key_digest, key_digests
from lastlayer.bottlenecks.parts import Row, part_schema
from lastlayer.bottlenecks.staging import STAGING, commit, discard_stale, new_run, stage_part
from lastlayer.bottlenecks.store import COMPACT_ABOVE, FeatureStore


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
    assert np.array_equal(
        again.source().rows(np.array([again.location(f"{7:064x}")]))[0], np.full(4, 7, np.float32)
    )
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


def test_float16_rows_are_kept_as_float16_and_merge_with_parts_of_errors_alone(tmp_path: Path):
    store = FeatureStore(str(tmp_path), 4, flush_rows=10)
    for k in range(COMPACT_ABOVE + 1):
        store.add(
            [Row(r.content, 0, r.path, r.stamp, r.feature.astype(np.float16), None) for r in rows(10, 10 * k)]
        )
    store.add([Row("f" * 64, 0, "c/bad.jpg", "1:1", None, "cannot decode: truncated")])
    store.flush()  # a part of one error row: float32, as before --train_top
    assert {pq.read_schema(p).field("feature").type.value_type for p in parts(tmp_path)} == {
        pa.float16(),
        pa.float32(),
    }
    store.compact()
    (merged,) = parts(tmp_path)
    assert pq.read_schema(merged) == part_schema(4, half=True)
    again = FeatureStore(str(tmp_path), 4)
    assert len(again) == 10 * (COMPACT_ABOVE + 1) + 1 and again.error("f" * 64) is not None
    features = again.source().rows(np.array([again.location(f"{37:064x}")]))
    assert features.dtype == np.float32 and np.array_equal(features[0], np.full(4, 37, np.float32))


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


def test_one_key_digest_equals_the_many_keys_one_and_no_two_test_keys_collide():
    keys = [f"{i:064x}" for i in range(2000)] + [hashlib.sha256(bytes([i])).hexdigest() for i in range(256)]
    many = key_digests(keys, 3)
    assert [key_digest(k, 3) for k in keys] == [d.tobytes() for d in many]
    assert len(set(many.tolist())) == len(keys)
    with pytest.raises(ValueError):
        key_digests(["not hex" * 8], 0)


def test_a_digest_map_keeps_the_first_or_the_last_value_across_merges():
    first, last = DigestMap(16, np.int64, first=True), DigestMap(16, np.int64, first=False)
    digests = key_digests([f"{i:064x}" for i in range(100)], 0)
    for m in (first, last):
        m.put_many(digests[:60], np.arange(60))
        m.put(digests[10].tobytes(), 1000)
        m.put_many(digests[50:], np.arange(50, 100) + 2000)
    assert first.get(digests[10].tobytes()) == 10 and last.get(digests[10].tobytes()) == 1000
    assert first.get(digests[55].tobytes()) == 55 and last.get(digests[55].tobytes()) == 2055
    values, found = first.get_many(key_digests([f"{i:064x}" for i in (5, 99, 100)], 0))
    assert found.tolist() == [True, True, False] and values[:2].tolist() == [5, 2099]


def test_staged_parts_of_a_failed_attempt_never_reach_the_folder(tmp_path: Path):
    run = new_run()
    first = stage_part(str(tmp_path), run, rows(5), 4)  # an attempt that wrote, then died
    second = stage_part(str(tmp_path), run, rows(5)[::-1], 4)  # the retry: same rows, other bytes
    assert first != second
    commit(str(tmp_path), run, [second])
    assert [p.name for p in parts(tmp_path)] == [second] and not (tmp_path / STAGING / run).exists()
    store = FeatureStore(str(tmp_path), 4)
    assert len(store) == 5 and store.damaged == 0
    stage_part(str(tmp_path), run, rows(3, start=10), 4)
    store.refresh()  # nothing committed: nothing new
    assert len(store) == 5


def test_only_stale_staging_folders_are_removed(tmp_path: Path):
    old, recent = f"{int(time.time()) - 3600}-old", new_run()
    for run in (old, recent):
        stage_part(str(tmp_path), run, rows(2), 4)
    discard_stale(str(tmp_path), 600)
    assert sorted(p.name for p in (tmp_path / STAGING).iterdir()) == [recent]


def test_the_keys_of_a_store_cost_bytes_not_objects_per_row(tmp_path: Path):
    n = 50_000
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    features = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n, np.float32)), 1)
    table = pa.table(
        {"content": keys, "variant": pa.array([0] * n, pa.int32()), "path": [f"c/{i}.jpg" for i in range(n)],
         "stamp": [f"9:{i}" for i in range(n)], "feature": features, "error": pa.nulls(n, pa.string()),
         "has_feature": pa.array(np.ones(n, bool))},
        schema=part_schema(1),
    )  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none")
    data = sink.getvalue().to_pybytes()
    (tmp_path / f"part-{hashlib.sha256(data).hexdigest()}.parquet").write_bytes(data)
    tracemalloc.start()
    store = FeatureStore(str(tmp_path), 1)
    assert store.has(keys[123]) and store.content_for("c/77.jpg", "9:77") == keys[77]
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held / n < 100  # 24 bytes of key and row, 48 of stamp and content (a dict: ~600)
