"""Dynamic batching: images of concurrent requests share one network call.

Each model has one :class:`Batcher`: requests put prepared images on a bounded queue; one asyncio
task takes the first waiting image and everything else queued (up to ``max_batch`` images), runs
the network on its own worker thread (the event loop never waits on onnxruntime) and hands each
request its row of probabilities. While a batch runs, the next one gathers in the queue.

A batch waits for more images only when some are on their way (a request announced them with
:meth:`Batcher.announced` while its image is decoded), and at most ``max_wait`` seconds after its
first image: a lone request never waits, and under load the images being decoded join the batch
instead of starting a batch of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lastlayer.model.inference import Answer, Prepared, RetrainedModel

#: Seconds :meth:`Batcher.stop` waits for the batch in progress.
STOP_SECONDS = 10.0

_Item = tuple[Prepared, "asyncio.Future[Answer]"]


class Busy(Exception):
    """The queue is full: the server is at capacity (an HTTP 503)."""


@dataclass
class Stats:
    """What a batcher did: images classified, network calls (batches) made."""

    images: int = 0
    batches: int = 0


class Batcher:
    """Batches the prepared images of one model's requests (see the module doc).

    Args:
        max_batch: most images per network call.
        max_wait: seconds a batch waits for more images after its first.
        max_queue: most images waiting; :meth:`submit` raises :class:`Busy` beyond.
    """

    def __init__(self, model: RetrainedModel, max_batch: int, max_wait: float, max_queue: int) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(max_queue)
        self.stats = Stats()
        self.incoming = 0  # images announced and not yet queued
        self._changed = asyncio.Event()  # set when an image is queued or an announcement ends
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lastlayer-network")
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the batching loop runs."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="lastlayer-batcher")

    async def stop(self) -> None:
        """Stop the loop (waiting at most :data:`STOP_SECONDS`) and fail the requests still queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, STOP_SECONDS)
        queued = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        _fail(queued, Busy("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def announced(self, images: int = 1) -> Iterator[None]:
        """While the block runs, ``images`` images are on their way: a batch being gathered waits
        for them (at most ``max_wait``). Call :meth:`submit` right after the block, with no ``await``
        in between."""
        self.incoming += images
        try:
            yield
        finally:
            self.incoming -= images
            self._changed.set()

    def submit(self, image: Prepared) -> asyncio.Future[Answer]:
        """Queue one prepared image (:meth:`RetrainedModel.prepare`) now; the future gets what the
        model says of it (:meth:`RetrainedModel.answers`).

        Raises:
            Busy: ``max_queue`` images are already waiting.
        """
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((image, future))
        except asyncio.QueueFull:
            raise Busy(f"{self.queue.maxsize} images are waiting") from None
        self._changed.set()
        return future

    async def _gather(self, batch: list[_Item]) -> None:
        """Fill ``batch`` (in place, so that a stop finds what was taken): the first waiting image,
        everything queued, and images announced as on their way that arrive within ``max_wait``;
        at most ``max_batch``."""
        loop = asyncio.get_running_loop()
        batch.append(await self.queue.get())
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if self.incoming <= 0 or left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch: list[_Item] = []
            try:
                await self._gather(batch)
                batch = [(x, f) for x, f in batch if not f.done()]  # a request that timed out is gone
                if not batch:
                    continue
                answers = await loop.run_in_executor(
                    self._executor, self.model.answers, [x for x, _ in batch]
                )
            except asyncio.CancelledError:
                _fail(batch, Busy("the server is shutting down"))
                raise
            except Exception as exc:  # handed to every request of the batch; the loop goes on
                _fail(batch, exc)
                continue
            self.stats.images += len(batch)
            self.stats.batches += 1
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
