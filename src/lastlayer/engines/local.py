"""The local engine: threads read and decode images while onnxruntime runs batches.

Both PIL's decoder and onnxruntime release the GIL, so on a small machine the decoding of the next
images overlaps the network's work on the current batch. A bounded window of submitted tasks keeps
memory flat whatever the number of images.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from lastlayer import storage
from lastlayer.engines.base import Need, NeedFn, Result, Task, content_key, variant_rng
from lastlayer.errors import DataError, StorageError
from lastlayer.preprocess import NO_DISTORTIONS, Distortions, distort, open_image, to_input
from lastlayer.zoo import FeatureModel

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    result: Result
    inputs: list[np.ndarray]
    slots: list[int | None]  # None: plain features; int: distorted variant number


def _prepare(
    task: Task,
    need: NeedFn,
    model: FeatureModel,
    distortions: Distortions,
    storage_options: Mapping[str, Any] | None,
) -> _Prepared:
    try:
        data = storage.read_bytes(task.url, storage_options)
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return _Prepared(Result(task, "", error="file vanished while the run was reading it"), [], [])
        raise
    content = content_key(data)
    wanted: Need = need(task, content)
    result = Result(task, content)
    if wanted.nothing:
        return _Prepared(result, [], [])
    try:
        img = open_image(data, model.preprocessing)
    except DataError as exc:
        result.error = str(exc)
        return _Prepared(result, [], [])
    inputs: list[np.ndarray] = []
    slots: list[int | None] = []
    if wanted.plain:
        inputs.append(to_input(img, model.preprocessing))
        slots.append(None)
    for v in wanted.variants:
        inputs.append(distort(img, model.preprocessing, distortions, variant_rng(content, distortions, v)))
        slots.append(v)
    return _Prepared(result, inputs, slots)


def default_threads() -> int:
    """Worker threads for decoding: one per core."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def extract(
    tasks: Iterable[Task],
    model: FeatureModel,
    need: NeedFn,
    *,
    distortions: Distortions = NO_DISTORTIONS,
    batch_size: int = 64,
    threads: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Result]:
    """Compute what ``need`` asks for, for each task; yield one :class:`Result` per task.

    Args:
        batch_size: images per onnxruntime call (a file's variants stay in one call).
        threads: decoding threads and onnxruntime intra-op threads; 0 = one per core.
        progress: called with the number of tasks finished so far.
    """
    threads = threads or default_threads()
    session = model.session(threads)
    window = max(2 * batch_size, 4 * threads)
    done = 0
    batch: list[_Prepared] = []

    def run_batch() -> Iterator[Result]:
        nonlocal done
        inputs = [x for p in batch for x in p.inputs]
        if inputs:
            (features,) = session.run(["features"], {"image": np.stack(inputs)})
            row = 0
            for p in batch:
                for slot in p.slots:
                    vec = np.array(features[row], np.float32)
                    if slot is None:
                        p.result.plain = vec
                    else:
                        p.result.variants[slot] = vec
                    row += 1
        for p in batch:
            done += 1
            yield p.result
        batch.clear()
        if progress is not None:
            progress(done)

    with ThreadPoolExecutor(threads, thread_name_prefix="lastlayer-decode") as pool:
        pending: deque[Future[_Prepared]] = deque()
        it = iter(tasks)

        def submit(n: int) -> None:
            for task in it:
                pending.append(pool.submit(_prepare, task, need, model, distortions, storage_options))
                n -= 1
                if n <= 0:
                    return

        try:
            submit(window)
            while pending:
                prepared = pending.popleft().result()
                submit(1)
                batch.append(prepared)
                if sum(len(p.inputs) for p in batch) >= batch_size or len(batch) >= window:
                    yield from run_batch()
            yield from run_batch()
        finally:
            for fut in pending:
                fut.cancel()
