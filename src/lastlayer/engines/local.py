"""The local engine: worker threads that each read, decode and run the network on a batch.

PIL's decoder and onnxruntime both release the GIL, so while one worker decodes, another runs its
network pass: decoding overlaps inference. A bounded window of submitted batches keeps memory flat
whatever the number of images.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from lastlayer.engines.base import Engine, NeedTest, Result, Task, available_cores
from lastlayer.engines.batch import Prepared, chunks, prepare, read_task, run_network
from lastlayer.model import runtime
from lastlayer.preprocess import NO_DISTORTIONS, Distortions
from lastlayer.zoo import FeatureModel

if TYPE_CHECKING:
    from lastlayer.bottlenecks.staging import CacheFolders
    from lastlayer.settings.run import EngineConfig

log = logging.getLogger(__name__)


class _Worker:
    """The sessions the worker threads run: on the CPU one single-threaded session per thread, on a
    GPU one session that every thread feeds (onnxruntime sessions take concurrent runs)."""

    def __init__(self, model: FeatureModel, device: str) -> None:
        self.model = model
        self.local = threading.local()
        self.shared = model.session(0, device) if device == runtime.CUDA else None

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
        device: where the network runs, :data:`~lastlayer.runtime.CPU` or
            :data:`~lastlayer.runtime.CUDA` (``auto`` is resolved when the engine is made).
    """

    name = "local"

    def __init__(
        self,
        threads: int = 0,
        batch_size: int = 4,
        storage_options: Mapping[str, Any] | None = None,
        device: str = runtime.CPU,
    ) -> None:
        self.threads = threads or available_cores()
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.device = runtime.resolve_device(device)

    @classmethod
    def from_config(
        cls, config: EngineConfig, storage_options: Mapping[str, Any] | None, spark_conf: Mapping[str, str]
    ) -> LocalEngine:
        engine = cls(config.num_threads, config.batch_size, storage_options, config.device)
        if engine.device == runtime.CUDA:
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
