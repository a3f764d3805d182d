"""The local engine: worker threads that each read, decode and run the network on a batch.

PIL's decoder and onnxruntime both release the GIL, so while one worker decodes, another runs its
network pass: decoding overlaps inference. A bounded window of submitted batches keeps memory flat
whatever the number of images.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import onnxruntime as ort

from lastlayer import contract, storage
from lastlayer.contract import FEATURES, IMAGE
from lastlayer.engines.base import (
    Engine,
    Need,
    NeedFn,
    NeedTest,
    Result,
    Task,
    available_cores,
    content_key,
    variant_rng,
)
from lastlayer.errors import DataError, EngineError, StorageError
from lastlayer.preprocess import (
    MAX_IMAGE_BYTES,
    NO_DISTORTIONS,
    Distortions,
    Preprocessing,
    distort,
    open_image,
    to_input,
)
from lastlayer.zoo import FeatureModel

if TYPE_CHECKING:
    from lastlayer.cache import CacheFolders
    from lastlayer.config import EngineConfig

log = logging.getLogger(__name__)


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
            if slot is None:
                result.plain = np.array(vec, np.float32)
            else:
                result.variants[slot] = np.array(vec, np.float32)
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


class _Worker:
    """The sessions the worker threads run: on the CPU one single-threaded session per thread, on a
    GPU one session that every thread feeds (onnxruntime sessions take concurrent runs)."""

    def __init__(self, model: FeatureModel, device: str) -> None:
        self.model = model
        self.local = threading.local()
        self.shared = model.session(0, device) if device == contract.CUDA else None

    def session(self) -> ort.InferenceSession:
        if self.shared is not None:
            return self.shared
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = self.model.session(1)
        return session

    def run(self, prepared: list[Prepared], batch_size: int) -> list[Result]:
        """Run this thread's session on ``prepared``."""
        return run_network(self.session(), prepared, batch_size)


class LocalEngine(Engine):
    """Worker threads in this process (see the module doc).

    Attributes:
        threads: worker threads (0: one per core).
        batch_size: images per network call.
        device: where the network runs, :data:`~lastlayer.contract.CPU` or
            :data:`~lastlayer.contract.CUDA` (``auto`` is resolved when the engine is made).
    """

    name = "local"

    def __init__(
        self,
        threads: int = 0,
        batch_size: int = 4,
        storage_options: Mapping[str, Any] | None = None,
        device: str = contract.CPU,
    ) -> None:
        self.threads = threads or available_cores()
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.device = contract.resolve_device(device)

    @classmethod
    def from_config(
        cls, config: EngineConfig, storage_options: Mapping[str, Any] | None, spark_conf: Mapping[str, str]
    ) -> LocalEngine:
        engine = cls(config.num_threads, config.batch_size, storage_options, config.device)
        if engine.device == contract.CUDA:
            engine.batch_size = config.gpu_batch_size
        return engine

    def extract(
        self,
        tasks: Sequence[Task],
        model: FeatureModel,
        need: NeedTest,
        distortions: Distortions = NO_DISTORTIONS,
        progress: Callable[[int], None] | None = None,
        cache: CacheFolders | None = None,
    ) -> Iterator[Result]:
        """Each of :attr:`threads` workers takes :attr:`batch_size` tasks at a time, reads and decodes
        them and runs its own single-threaded onnxruntime session on them. With as many workers as
        cores, one worker's decoding overlaps another's network pass without oversubscribing the
        cores, and no thread ever waits at a parallel-for barrier. On a GPU the workers decode on
        every core and take turns with one session on the GPU."""
        worker = _Worker(model, self.device)

        def job(chunk: list[Task]) -> list[Result]:
            prepared = [
                prepare(task, read_task(task, self.storage_options), need, model.preprocessing, distortions)
                for task in chunk
            ]
            return worker.run(prepared, self.batch_size)

        done = 0
        with ThreadPoolExecutor(self.threads, thread_name_prefix="lastlayer-extract") as pool:
            pending: deque[Future[list[Result]]] = deque()
            batches = chunks(tasks, self.batch_size)
            try:
                for chunk in itertools.islice(batches, 2 * self.threads):
                    pending.append(pool.submit(job, chunk))
                while pending:
                    results = pending.popleft().result()
                    for chunk in itertools.islice(batches, 1):
                        pending.append(pool.submit(job, chunk))
                    done += len(results)
                    yield from results
                    if progress is not None:
                        progress(done)
            finally:
                for fut in pending:
                    fut.cancel()


def chunks(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    """``tasks`` in lists of ``size`` (the last one shorter)."""
    it = iter(tasks)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
