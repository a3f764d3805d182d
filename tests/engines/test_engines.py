"""The engines' registry and the per-batch work both engines share (:mod:`lastlayer.engines.batch`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import jpeg_bytes
from lastlayer.engines import engine_class, make_engine
from lastlayer.engines.base import Need, Task
from lastlayer.engines.batch import PREFETCH_POLL_S, VANISHED, chunks, prefetch, prepare, read_task
from lastlayer.engines.local import LocalEngine
from lastlayer.preprocess import NO_DISTORTIONS, Distortions
from lastlayer.settings.run import KNOWN_ENGINES, EngineConfig
from lastlayer.zoo import DEFAULT_ARCHITECTURE, resolve


def test_an_engine_is_made_from_its_registered_class():
    assert set(KNOWN_ENGINES) == {"local", "spark"}
    assert engine_class("local") is LocalEngine
    with make_engine(EngineConfig(num_threads=2, batch_size=3)) as engine:
        assert isinstance(engine, LocalEngine) and engine.threads == 2 and engine.batch_size == 3


def test_chunks_cut_tasks_into_batches_the_last_one_shorter():
    tasks = [Task(i, f"{i}.jpg", f"{i}.jpg", None, False) for i in range(7)]
    assert [[t.index for t in chunk] for chunk in chunks(tasks, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []


def test_a_task_s_bytes_become_its_inputs_or_its_reason(tmp_path: Path):
    preprocessing = resolve(DEFAULT_ARCHITECTURE)[1].preprocessing
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (30, 20), "red")))
    task = Task(0, str(tmp_path / "a.jpg"), "a.jpg", None, True)
    data = read_task(task, None)
    assert (
        data is not None
        and read_task(Task(1, str(tmp_path / "gone.jpg"), "gone.jpg", None, True), None) is None
    )

    def plain_and_two_variants(task: Task, content: str) -> Need:
        return Need(plain=True, variants=(1, 2))

    flip = Distortions(flip_left_right=True)
    ready = prepare(task, data, plain_and_two_variants, preprocessing, flip)
    size = preprocessing.size
    assert ready.slots == [None, 1, 2] and [x.shape for x in ready.inputs] == [(size, size, 3)] * 3
    assert len(ready.result.content) == 64 and ready.result.error is None
    again = prepare(task, data, plain_and_two_variants, preprocessing, flip)
    assert all(np.array_equal(a, b) for a, b in zip(ready.inputs, again.inputs, strict=True))  # seeded
    assert prepare(task, None, plain_and_two_variants, preprocessing, NO_DISTORTIONS).result.error == VANISHED
    broken = prepare(task, b"not an image", plain_and_two_variants, preprocessing, NO_DISTORTIONS)
    assert broken.inputs == [] and broken.result.error


def test_prefetch_keeps_order_hands_over_errors_and_stops_its_thread():
    with prefetch(iter(range(50)), 2) as ready:
        assert list(ready) == list(range(50))

    def broken():
        yield 1
        raise OSError("read failed (test)")

    with pytest.raises(OSError, match="read failed"), prefetch(broken(), 2) as ready:
        list(ready)
    produced: list[int] = []

    def counted():
        for i in range(10**6):
            produced.append(i)
            yield i

    with prefetch(counted(), 2) as ready:
        assert next(ready) == 0
    time.sleep(2 * PREFETCH_POLL_S)
    assert len(produced) <= 5  # the producer stopped when the block was left
    assert not [t for t in threading.enumerate() if t.name == "lastlayer-prefetch"]
