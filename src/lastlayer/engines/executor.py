"""What a Spark task runs on an executor: one partition of a wave of images read, decoded, run through
the network and staged as part files (the driver's side is :mod:`lastlayer.engines.spark`).

A Python worker imports this module when it unpickles its first task, so it imports only what a task
needs: not the zoo, not onnx (:class:`Network` stands in for the feature model), not the driver's
Spark code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import onnxruntime as ort

from lastlayer.engines.base import NeedFn, Result, Task
from lastlayer.engines.batch import Prepared, prefetch, prepare, read_task, run_network
from lastlayer.model import runtime
from lastlayer.preprocess import Distortions, Preprocessing

if TYPE_CHECKING:
    from pyspark import Broadcast

    from lastlayer.bottlenecks.parts import Row
    from lastlayer.bottlenecks.staging import CacheFolders
    from lastlayer.zoo import FeatureModel

#: Network batches a task's reading and decoding thread may run ahead of its network.
PREFETCH_BATCHES = 2

# One onnxruntime session per model in each Python worker, kept between tasks (workers are reused).
_sessions: dict[str, ort.InferenceSession] = {}


class Network(NamedTuple):
    """What the executors need of a :class:`~lastlayer.zoo.FeatureModel` (broadcast instead of it:
    unpickling a FeatureModel imports the zoo and onnx, ~1 s of each worker's first task)."""

    onnx_bytes: bytes
    architecture: str
    key: str
    preprocessing: Preprocessing

    @classmethod
    def of(cls, model: FeatureModel) -> Network:
        return cls(model.onnx_bytes, model.architecture, model.key, model.preprocessing)


class Outcome(NamedTuple):
    """What a task reports to the driver: one per image, and one per part file it wrote.

    Attributes:
        index: the image's :attr:`Task.index`, or -1 for a part file.
        content: the image's content key ("" when it vanished).
        error: why it could not be used, or ``None``.
        stored: feature vectors computed and written for it.
        part: the name of a part file written to the staging folder, or ``None``.
        distorted: whether that part file goes to the distorted variants' folder.
    """

    index: int
    content: str
    error: str | None
    stored: int
    part: str | None = None
    distorted: bool = False


def _session_for(network: Network, threads: int) -> ort.InferenceSession:
    key = f"{network.key}:{threads}"
    if key not in _sessions:
        _sessions[key] = runtime.session(network.onnx_bytes, network.architecture, threads)
    return _sessions[key]


def _network_batches(prepared: Iterable[Prepared], batch_size: int) -> Iterator[list[Prepared]]:
    """``prepared`` grouped into lists of at least ``batch_size`` network inputs (the last: fewer)."""
    chunk: list[Prepared] = []
    for item in prepared:
        chunk.append(item)
        if sum(len(p.inputs) for p in chunk) >= batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Staging:
    """A task's rows on their way to the cache: a part file per folder per
    :data:`~lastlayer.bottlenecks.store.FLUSH_ROWS` rows, and at the end of the task, in the staging folder of
    ``run``."""

    def __init__(self, folders: CacheFolders, run: str) -> None:
        self.folders, self.run = folders, run
        self.rows: tuple[list[Row], list[Row]] = ([], [])

    def add(self, result: Result) -> Iterator[Outcome]:
        """Keep the rows of ``result``; yield the part files written."""
        from lastlayer.bottlenecks.store import FLUSH_ROWS  # (cache imports: see Result.rows)

        for rows, more in zip(self.rows, result.rows(), strict=True):
            rows.extend(more)
        if max(len(rows) for rows in self.rows) >= FLUSH_ROWS:
            yield from self.close()

    def close(self) -> Iterator[Outcome]:
        """Write what is kept; yield the part files written."""
        from lastlayer.bottlenecks.staging import stage_part

        for distorted, rows in enumerate(self.rows):
            folder = self.folders.distorted if distorted else self.folders.plain
            if rows and folder is not None:
                name = stage_part(folder, self.run, rows, self.folders.dim, self.folders.storage_options)
                yield Outcome(-1, "", None, 0, name, bool(distorted))
            rows.clear()


def extract(
    tasks: Iterable[Task],
    model_bc: Broadcast[Network],
    need_bc: Broadcast[NeedFn],
    folders: CacheFolders,
    run: str,
    distortions: Distortions,
    batch_size: int,
) -> Iterator[Outcome]:
    """One partition: read, decode and prepare its images in one thread, run the network in this one,
    stage the rows; an outcome per image and per part file."""
    from pyspark import TaskContext

    context = TaskContext.get()
    model, need = model_bc.value, need_bc.value
    prepared = (
        prepare(t, read_task(t, folders.storage_options), need, model.preprocessing, distortions)
        for t in tasks
    )
    staging = _Staging(folders, run)
    with prefetch(_network_batches(prepared, batch_size), PREFETCH_BATCHES) as ready:
        network = _session_for(model, int(context.cpus()) if context is not None else 1)  # while it decodes
        for chunk in ready:
            for result in run_network(network, chunk, batch_size):
                stored = int(result.plain is not None) + len(result.variants)
                yield Outcome(result.task.index, result.content, result.error, stored)
                yield from staging.add(result)
    yield from staging.close()
