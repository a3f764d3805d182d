"""Training without the feature matrix: stores that load keys only, today's files still read, damage
found when a part is streamed, locations that survive compaction, and passes whose memory does not
grow with the number of images but give what in-memory training gave."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import FakeEngine, make_dataset
from lastlayer import pipeline
from lastlayer.bottlenecks import parts, passes
from lastlayer.bottlenecks import store as cache_store
from lastlayer.bottlenecks.extraction import extract
from lastlayer.bottlenecks.needs import combine, compute_bottlenecks
from lastlayer.bottlenecks.parts import Row, part_schema
from lastlayer.bottlenecks.store import FeatureStore
from lastlayer.dataset import TESTING, TRAINING, VALIDATION, scan
from lastlayer.engines.base import NeedTest, Result, Task
from lastlayer.preprocess import Distortions
from lastlayer.settings.run import TrainingConfig
from lastlayer.training.data import TrainingData, final_fit, load, plan_variants
from lastlayer.training.evaluate import evaluate
from lastlayer.training.train import Classifier, Standardizer
from lastlayer.zoo import DEFAULT_ARCHITECTURE, FeatureModel, resolve

DIM = 16


def rows(n: int, start: int = 0, dim: int = DIM) -> list[Row]:
    return [
        Row(f"{i:064x}", 0, f"c/{i}.jpg", f"10:{i}", np.full(dim, i, np.float32), None)
        for i in range(start, start + n)
    ]


def feature_of(store: FeatureStore, i: int) -> np.ndarray:
    return store.source().rows(np.array([store.location(f"{i:064x}")]))[0]


def test_todays_part_files_are_read_and_merged_into_new_ones(tmp_path: Path):
    legacy = pa.table(
        {
            "content": [f"{0:064x}", f"{1:064x}", f"{1:064x}", "e" * 64],
            "variant": pa.array([0, 0, 0, 0], pa.int32()),
            "path": ["c/0.jpg", "c/1.jpg", "moved/1.jpg", "c/bad.jpg"],
            "stamp": ["1:0", "1:1", "1:9", "1:2"],
            "feature": pa.FixedSizeListArray.from_arrays(
                pa.array(np.repeat(np.array([0, 1, 0, 0], np.float32), DIM)),
                DIM,
                mask=pa.array([False, False, True, True]),
            ),
            "error": [None, None, None, "cannot decode"],
        },
        schema=part_schema(DIM, legacy=True),
    )
    sink = pa.BufferOutputStream()
    pq.write_table(legacy, sink, compression="none")
    data = sink.getvalue().to_pybytes()
    (tmp_path / f"part-{hashlib.sha256(data).hexdigest()}.parquet").write_bytes(data)
    store = FeatureStore(str(tmp_path), DIM)
    assert len(store) == 3 and store.damaged == 0 and store.error("e" * 64) == "cannot decode"
    assert store.content_for("moved/1.jpg", "1:9") == f"{1:064x}"  # a path record, not a row
    assert np.array_equal(feature_of(store, 1), np.ones(DIM, np.float32))
    store.flush_rows = 1
    for i in range(10, 10 + cache_store.COMPACT_ABOVE):
        store.add(rows(1, start=i))  # one small new-format file each
    store.compact()
    (merged,) = tmp_path.glob("part-*")
    assert merged.name.endswith(".v2.parquet")
    for again in (store, FeatureStore(str(tmp_path), DIM)):
        assert len(again) == 3 + cache_store.COMPACT_ABOVE and again.content_for("moved/1.jpg", "1:9")
        assert [feature_of(again, i)[0] for i in (1, 12)] == [1, 12]  # locations follow the merge


def feature_column_range(path: Path) -> tuple[int, int]:
    chunk = pq.read_metadata(path).row_group(0).column(part_schema(DIM).names.index("feature"))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    return start, start + chunk.total_compressed_size


def test_a_large_part_loads_its_keys_alone_and_is_checked_when_streamed(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(cache_store, "WHOLE_READ_BYTES", 0)  # every part is "large"
    store = FeatureStore(str(tmp_path), DIM)
    store.add(rows(50))
    store.flush()
    (part,) = tmp_path.glob("part-*")
    start, end = feature_column_range(part)
    data = bytearray(part.read_bytes())
    data[(start + end) // 2] ^= 0xFF  # a feature damaged: the key columns are intact
    part.write_bytes(bytes(data))
    again = FeatureStore(str(tmp_path), DIM)
    assert len(again) == 50 and again.damaged == 0  # the keys load (their pages check out)
    source = again.source()
    with pytest.raises(parts.UnreadablePart) as found:
        source.read(0, verify=True)
    assert not found.value.vanished
    data[(start + end) // 2] ^= 0xFF
    data[start - 20] ^= 0xFF  # now a key column's page
    part.write_bytes(bytes(data))
    assert FeatureStore(str(tmp_path), DIM).damaged == 1 and not part.exists()


class Counting(FakeEngine):
    """Features that tell the classes apart (a one-hot of the class folder plus noise) and distorted
    variants as asked; counts the network passes."""

    name = "counting"

    def __init__(self, dim: int = DIM) -> None:
        self.dim, self.passes = dim, 0

    def extract(
        self,
        tasks: Sequence[Task],
        model: FeatureModel,
        need: NeedTest,
        distortions: Distortions,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Result]:
        for task in tasks:
            content = hashlib.sha256(task.relpath.encode()).hexdigest()
            wanted = need(task, content)
            if "bad" in task.relpath:
                yield Result(task, content, error="cannot decode (test)")
                continue
            rng = np.random.default_rng(task.index)
            vec = rng.normal(0, 0.3, self.dim).astype(np.float32)
            vec[hash(task.relpath.split("/")[0]) % self.dim] += 2.0
            variants = {v: vec + rng.normal(0, 0.1, self.dim).astype(np.float32) for v in wanted.variants}
            self.passes += int(wanted.plain) + len(variants)
            yield Result(task, content, vec if wanted.plain else None, variants)


def tiny(key: str, dim: int = DIM) -> FeatureModel:
    return FeatureModel(key, b"", resolve(DEFAULT_ARCHITECTURE)[1].preprocessing, dim, key * 64)


def training_data(tmp_path: Path, per_class: int = 20, **flags) -> tuple[TrainingData, TrainingConfig]:
    images = scan(str(make_dataset(tmp_path / "data", per_class=per_class)), 20, 20)
    config = TrainingConfig(how_many_training_steps=80, random_seed=5, **flags)
    engine = Counting()
    found = compute_bottlenecks(images, tiny("a"), str(tmp_path / "cache"), engine)
    return TrainingData.of(images, found), config


def fitted(data: TrainingData, config: TrainingConfig) -> tuple[Classifier, np.ndarray]:
    fit = final_fit(data, config, 5)
    clf = data.train(fit)
    everything = np.concatenate([data.index[s] for s in (TRAINING, VALIDATION, TESTING)])
    truth = np.concatenate([data.labels[s] for s in (TRAINING, VALIDATION, TESTING)])
    predicted = data.predict([clf], everything, truth, np.zeros(len(truth), np.int64))
    return clf, np.stack([predicted.predicted, predicted.confidence, predicted.true_probability])


def test_spilled_rows_and_chunked_logits_give_the_in_memory_results(tmp_path: Path, monkeypatch):
    data, config = training_data(tmp_path)
    in_memory, scores = fitted(data, config)
    x = data.bottlenecks.read(data.index[TRAINING])
    fit = final_fit(data, config, 5)
    scaler = data._prepared[fit.key][0]
    assert np.allclose(scaler.mean, Standardizer.of(x).mean, atol=1e-6)
    assert np.allclose(scaler.scale, Standardizer.of(x).scale, rtol=1e-5)
    monkeypatch.setattr(passes, "GATHER_BYTES", 0)  # every gathered row in a temporary file
    monkeypatch.setattr(passes, "LOGITS_BYTES", 4 * 3 * 7)  # logits of 7 rows at a time
    again, _ = training_data(tmp_path)
    spilled, spilled_scores = fitted(again, config)
    assert again._prepared[fit.key][1]._file is not None
    assert np.array_equal(spilled.weights, in_memory.weights) and np.array_equal(
        spilled.biases, in_memory.biases
    )
    assert np.allclose(spilled_scores, scores, atol=1e-6)
    again.close()


def test_statistics_merged_by_cells_equal_those_of_all_rows_at_once():
    rng = np.random.default_rng(3)
    x = (rng.normal(5, 2, (1000, 6)) * [1, 10, 100, 1e-3, 1, 1]).astype(np.float32)
    cells = rng.integers(0, 4, 1000)
    moments = passes.Moments(4, [4, 2])
    for start in range(0, 1000, 128):  # parts of 128 rows, two networks
        at = slice(start, start + 128)
        moments.add(0, cells[at], x[at, :4])
        moments.add(1, cells[at], x[at, 4:])
    mean, std = moments.merged([0, 2, 3])
    mine = np.isin(cells, [0, 2, 3])
    assert np.allclose(mean, x[mine].mean(axis=0, dtype=np.float64), rtol=1e-12)
    assert np.allclose(std, x[mine].std(axis=0, dtype=np.float64), rtol=1e-10)


def test_an_ensemble_s_predictions_add_every_network_s_share(tmp_path: Path, monkeypatch):
    images = scan(str(make_dataset(tmp_path / "data", per_class=10)), 20, 20)
    parts = [
        compute_bottlenecks(images, tiny(k, dim), str(tmp_path / "cache"), Counting(dim))
        for k, dim in (("a", 8), ("b", 5))
    ]
    both = combine(parts)
    assert both.dim == 13 and both.plain.shape == (30, 2)
    monkeypatch.setattr(passes, "LOGITS_BYTES", 4 * 3 * 4)
    rng = np.random.default_rng(0)
    clfs = [Classifier(rng.normal(0, 1, (13, 3)).astype(np.float32), rng.normal(0, 1, 3).astype(np.float32))]
    truth = images.label_index.astype(np.int64)
    predicted = passes.predict(both, np.arange(30), clfs, np.zeros(30, np.int64), truth)
    x = np.hstack([p.read(np.arange(30)) for p in parts])
    assert np.array_equal(predicted.predicted, clfs[0].predict(x))


def test_a_pass_holds_a_few_parts_never_the_feature_matrix(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(passes, "GATHER_BYTES", 0)
    data, _ = training_data(tmp_path, per_class=4)
    store = FeatureStore(str(tmp_path / "big"), 256, flush_rows=512)
    for start in range(0, 16384, 512):
        store.add(rows(512, start, dim=256))  # 16 MiB of features in 32 parts
    source = store.source()
    b = data.bottlenecks
    ids = np.arange(16384)
    locations = np.array([store.location(f"{i:064x}") for i in ids])
    big = type(b)(
        (source,), (), locations[:, None], b.variant_images, b.variants, np.ones(16384, bool), [], 0, 0, 0
    )
    tracemalloc.start()
    moments, held = passes.load(big, (ids, ids % 3, 3), ids[::7], ids)
    clf = Classifier(np.ones((256, 3), np.float32), np.zeros(3, np.float32))
    passes.predict(big, ids, [clf], np.zeros(16384, np.int64), ids % 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    held.close()
    assert moments.count[:, 0].sum() == 16384
    assert peak < 8 << 20, peak  # half the 16 MiB matrix: a few parts of 0.5 MiB, float64 copies, the ids


def test_with_distortions_training_images_train_and_standardize_on_their_variants(tmp_path: Path):
    images = scan(str(make_dataset(tmp_path / "data", per_class=20)), 20, 20)
    training = TrainingConfig(
        how_many_training_steps=3, train_batch_size=4, random_seed=2, flip_left_right=True
    )
    run = pipeline.Run(
        "", "x", training, pipeline.CacheConfig(), pipeline.OutputConfig(), pipeline.EngineConfig(), {}
    )
    draws = plan_variants(images, run.training, run.engine.worker_count, 2)
    engine = Counting()
    found = compute_bottlenecks(
        images,
        tiny("a"),
        str(tmp_path / "c"),
        engine,
        distortions=training.distortions,
        variants=5,
        draws=draws,
    )
    train_at = images.indices(TRAINING)
    assert (found.plain[train_at] == -1).all()  # no plain pass for a training image
    drawn = train_at[draws[train_at] > 0]
    assert np.array_equal(np.unique(found.variant_images), drawn)
    assert engine.passes == len(images.files) - len(train_at) + int(np.minimum(draws, 5).sum())
    data = TrainingData.of(images, found)
    fit = final_fit(data, training, 2)
    data.prepare([fit])
    variants = found.read(len(images.files) + np.arange(len(found.variant_images)))
    assert np.allclose(data._prepared[fit.key][0].mean, variants.mean(axis=0), atol=1e-6)
    scores = evaluate(data.train(fit), data, images, -1, 2, pipeline.OutputConfig())
    assert (
        scores.accuracy_all[TRAINING] is not None and scores.test.predicted.shape == data.index[TESTING].shape
    )


def test_unusable_training_images_make_the_run_plan_its_draws_again(tmp_path: Path):
    folder = make_dataset(tmp_path / "data", per_class=20)
    for k in range(6):
        (folder / "blue_squares" / f"bad_{k}.jpg").write_bytes(b"x")
    images = scan(str(folder), 20, 20)
    bad = [i for i, f in enumerate(images.files) if "bad" in f.relpath and f.split == TRAINING]
    assert bad  # some are training images, which the first plan draws
    training = TrainingConfig(
        how_many_training_steps=30, train_batch_size=10, random_seed=2, flip_left_right=True
    )
    run = pipeline.Run(
        str(folder), "x", training, pipeline.CacheConfig(bottleneck_dir=str(tmp_path / "c")),
        pipeline.OutputConfig(), pipeline.EngineConfig(), {},
    )  # fmt: skip
    draws = plan_variants(images, run.training, run.engine.worker_count, 2)
    assert (draws[bad] > 0).any()
    engine, model = Counting(), pipeline.Backbones((tiny("a"),))
    found = extract(images, model, engine, run.source(), None, draws)
    with load(images, model, engine, run.source(), found, draws, run.training, 2) as data:
        assert not set(bad) & set(data.index[TRAINING].tolist())
        replanned = plan_variants(images, run.training, run.engine.worker_count, 2, data.index[TRAINING])
        drawn = np.flatnonzero(replanned > 0)
        assert np.array_equal(np.unique(data.bottlenecks.variant_images), drawn)
        clf = data.train(final_fit(data, training, 2))
    assert np.isfinite(clf.weights).all()
