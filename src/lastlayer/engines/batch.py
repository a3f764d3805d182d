"""The per-batch work every engine shares: read a task's image, prepare its network inputs (plain and
distorted), run a network on a batch of them, and overlap reading with computing (:func:`prefetch`).

The local engine runs it in threads of this process; the Spark engine in its executors.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from lastlayer import storage
from lastlayer.bottlenecks.keys import content_key, variant_rng
from lastlayer.engines.base import Need, NeedFn, Result, Task
from lastlayer.errors import DataError, EngineError, StorageError
from lastlayer.model.contract import FEATURES, IMAGE
from lastlayer.preprocess import MAX_IMAGE_BYTES, Distortions, Preprocessing, distort, open_image, to_input

if TYPE_CHECKING:
    import onnxruntime as ort

#: Why an image listed by the scan gave no bytes.
VANISHED = "file vanished while the run was reading it"
#: Seconds between looks at the other thread while one thread of :func:`prefetch` waits.
PREFETCH_POLL_S = 1.0

T = TypeVar("T")


@dataclass
class Prepared:
    """One task made ready for the network: its result so far and its network inputs.

    Attributes:
        slots: one per input: ``None`` for plain features, else the distorted variant number.
    """

    result: Result
    inputs: list[np.ndarray]
    slots: list[int | None]


def read_task(task: Task, storage_options: Mapping[str, Any] | None) -> bytes | DataError | None:
    """The bytes of the task's image; ``None`` when the file vanished since it was listed; why it
    was not read when it is not a regular file of at most :data:`MAX_IMAGE_BYTES`."""
    try:
        return storage.read_bytes(task.url, storage_options, MAX_IMAGE_BYTES, "the image")
    except DataError as exc:
        return exc
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise


def prepare(
    task: Task,
    data: bytes | DataError | None,
    need: NeedFn,
    preprocessing: Preprocessing,
    distortions: Distortions,
) -> Prepared:
    """Hash, decode and preprocess one image's bytes into the inputs ``need`` asks for (every engine's
    per-image work); an image that cannot be decoded gets its error in the result."""
    if data is None:
        return Prepared(Result(task, "", error=VANISHED), [], [])
    if isinstance(data, DataError):
        return Prepared(Result(task, "", error=str(data)), [], [])
    content = content_key(data)
    wanted: Need = need(task, content)
    result = Result(task, content)
    if wanted.nothing:
        return Prepared(result, [], [])
    try:
        img = open_image(data, preprocessing)
    except DataError as exc:
        result.error = str(exc)
        return Prepared(result, [], [])
    inputs: list[np.ndarray] = []
    slots: list[int | None] = []
    if wanted.plain:
        inputs.append(to_input(img, preprocessing))
        slots.append(None)
    for v in wanted.variants:
        inputs.append(distort(img, preprocessing, distortions, variant_rng(content, distortions, v)))
        slots.append(v)
    return Prepared(result, inputs, slots)


def run_network(session: ort.InferenceSession, prepared: list[Prepared], batch_size: int) -> list[Result]:
    """Run the network on every input of ``prepared``, ``batch_size`` at a time; fill the results."""
    slots = [(p.result, slot) for p in prepared for slot in p.slots]
    inputs = [x for p in prepared for x in p.inputs]
    for start in range(0, len(inputs), batch_size):
        batch = np.stack(inputs[start : start + batch_size])
        (features,) = session.run([FEATURES], {IMAGE: batch})
        for (result, slot), vec in zip(slots[start : start + batch_size], features, strict=True):
            if slot is None:  # a copy, in the network's type (float16 activations, --train_top)
                result.plain = np.array(vec)
            else:
                result.variants[slot] = np.array(vec)
    return [p.result for p in prepared]


@contextmanager
def prefetch(items: Iterable[T], depth: int) -> Iterator[Iterator[T]]:
    """Iterate ``items`` in a thread of its own, started at once and at most ``depth`` items ahead of
    the consumer, so that producing the next items (reading, hashing, decoding: PIL releases the GIL)
    overlaps consuming this one (the network). Yields the iterator of the items; the producer's
    exception is raised in the consumer; leaving the block stops the producer after its current item.
    """
    buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=PREFETCH_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((False, exc))

    def handover() -> Iterator[T]:
        while True:
            try:
                ok, item = buffer.get(timeout=PREFETCH_POLL_S)
            except queue.Empty:
                if not thread.is_alive():
                    raise EngineError("the decoding thread ended without handing over its work") from None
                continue
            if not ok:
                raise item
            if item is end:
                return
            yield item

    thread = threading.Thread(target=produce, name="lastlayer-prefetch", daemon=True)
    thread.start()
    try:
        yield handover()
    finally:
        stop.set()
        thread.join(PREFETCH_POLL_S)


def chunks(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    """``tasks`` in lists of ``size`` (the last one shorter)."""
    it = iter(tasks)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
