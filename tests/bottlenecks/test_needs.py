"""The bottleneck stage alone: what the cache lacks, what an engine is asked for, what comes back."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from helpers import FakeEngine, make_dataset
from lastlayer.bottlenecks.keys import CachedKeys, distortion_key
from lastlayer.bottlenecks.needs import CacheNeed, compute_bottlenecks, in_shard
from lastlayer.bottlenecks.parts import Row
from lastlayer.bottlenecks.store import FeatureStore
from lastlayer.dataset import scan
from lastlayer.engines.base import Need, NeedTest, Result, Task
from lastlayer.preprocess import Distortions
from lastlayer.zoo import DEFAULT_ARCHITECTURE, FeatureModel, resolve

DIM = 4
DISTORT = Distortions(flip_left_right=True)


class Recorder(FakeEngine):
    """Answers every task with fixed features (variants as asked), a decode error for names
    containing 'bad', and a vanished file for names containing 'gone'; records the needs it saw."""

    name = "recorder"

    def __init__(self) -> None:
        self.needs: dict[str, Need] = {}

    def extract(
        self,
        tasks: Sequence[Task],
        model: FeatureModel,
        need: NeedTest,
        distortions: Distortions,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Result]:
        for done, task in enumerate(tasks, 1):
            if "gone" in task.relpath:
                yield Result(task, "", error="file vanished while the run was reading it")
                continue
            content = hashlib.sha256(task.relpath.encode()).hexdigest()
            wanted = need(task, content)
            self.needs[task.relpath] = wanted
            if "bad" in task.relpath:
                yield Result(task, content, error="cannot decode (test)")
            else:
                vec = np.full(DIM, task.index, np.float32)
                variants = {v: vec + 1000 * (v + 1) for v in wanted.variants}
                yield Result(task, content, vec if wanted.plain else None, variants)
            if progress is not None:
                progress(done)


@pytest.fixture
def model() -> FeatureModel:
    return FeatureModel("rec", b"", resolve(DEFAULT_ARCHITECTURE)[1].preprocessing, DIM, "1" * 64)


def test_rows_point_into_the_cache_and_errors_are_cached_and_skipped(tmp_path, model):
    data = make_dataset(tmp_path / "d", per_class=4)
    (data / "Red Circles" / "bad.jpg").write_bytes(b"x")
    images = scan(str(data), 25, 25)
    engine = Recorder()
    seen: list[tuple[int, int]] = []
    b = compute_bottlenecks(
        images, model, str(tmp_path / "c"), engine, progress=lambda d, t: seen.append((d, t))
    )
    assert b.computed == 12 and b.reused == 0 and seen[-1] == (13, 13)
    assert b.skipped == [("Red Circles/bad.jpg", "cannot decode (test)")]
    for i, f in enumerate(images.files):
        if "bad" not in f.relpath:
            assert b.read(np.array([i]))[0][0] == i
    again_engine = Recorder()
    again = compute_bottlenecks(images, model, str(tmp_path / "c"), again_engine)
    assert again.computed == 0 and again.reused == 12 and not again_engine.needs  # nothing asked
    assert again.skipped == b.skipped


def test_variants_are_asked_for_training_images_only_and_kept_per_distortion(tmp_path, model):
    data = make_dataset(tmp_path / "d", per_class=4)
    images = scan(str(data), 25, 25)
    engine = Recorder()
    b = compute_bottlenecks(images, model, str(tmp_path / "c"), engine, distortions=DISTORT, variants=3)
    training = [f.relpath for f in images.files if f.split == "training"]
    assert {p for p, n in engine.needs.items() if n.variants == (0, 1, 2)} == set(training)
    assert all(n.variants == () for p, n in engine.needs.items() if p not in training)
    start, count = b.variant_range(np.array([i for i, f in enumerate(images.files) if f.split == "training"]))
    assert (count == 3).all() and b.read(len(images.files) + start[:1] + 2)[0][0] >= 3000
    folder = next((tmp_path / "c").iterdir()) / distortion_key(DISTORT)
    assert folder.is_dir()
    more = Recorder()
    compute_bottlenecks(images, model, str(tmp_path / "c"), more, distortions=DISTORT, variants=4)
    assert {n.variants for n in more.needs.values() if n.variants} == {(3,)} and not any(
        n.plain for n in more.needs.values()
    )


def test_shards_split_the_work_and_count_the_rest_as_pending(tmp_path, model):
    data = make_dataset(tmp_path / "d", per_class=6)
    images = scan(str(data), 10, 10)
    mine = [f for f in images.files if in_shard(f.relpath, (1, 3))]
    b = compute_bottlenecks(images, model, str(tmp_path / "c"), Recorder(), shard=(1, 3))
    assert b.computed == len(mine) and b.pending == 18 - len(mine)
    assert int(b.usable.sum()) == int((b.plain >= 0).sum()) == len(mine)


def test_a_vanished_file_is_skipped_with_its_reason(tmp_path, model):
    data = make_dataset(tmp_path / "d", per_class=4)
    (data / "blue_squares" / "gone.jpg").write_bytes(b"soon gone")
    images = scan(str(data), 10, 10)
    b = compute_bottlenecks(images, model, str(tmp_path / "c"), Recorder())
    assert b.skipped == [("blue_squares/gone.jpg", "file vanished while the run was reading it")]


def test_the_need_test_travels_as_a_picklable_copy(tmp_path):
    store = FeatureStore(str(tmp_path / "s"), DIM)
    store.add([Row("a" * 64, 0, "x/a.jpg", None, np.zeros(DIM, np.float32), None)])
    store.add([Row("b" * 64, 0, "x/b.jpg", None, None, "broken")])
    store.flush()
    need = CacheNeed(store, None, 0)
    portable = pickle.loads(pickle.dumps(need.portable()))
    assert isinstance(portable.plain, CachedKeys)
    task = Task(0, "u", "x/c.jpg", None, True)
    for content, expected in (("a" * 64, Need(False)), ("b" * 64, Need(False)), ("c" * 64, Need(True))):
        assert need(task, content) == portable(task, content) == expected
