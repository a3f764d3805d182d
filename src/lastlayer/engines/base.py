"""What every engine is, takes and gives back: the :class:`Engine` interface, :class:`Task`,
:class:`Need` and :class:`Result`."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from lastlayer.preprocess import Distortions

if TYPE_CHECKING:
    from typing import Self

    from lastlayer.bottlenecks.parts import Row
    from lastlayer.bottlenecks.staging import CacheFolders
    from lastlayer.settings.run import EngineConfig
    from lastlayer.zoo import FeatureModel


@dataclass(frozen=True)
class Task:
    """One image to look at.

    Attributes:
        index: position of the image in the image set.
        url: where to read it.
        relpath: its path relative to image_dir.
        stamp: ``"<size>:<mtime>"`` as listed, or ``None``.
        training: whether distorted variants may be wanted for it.
    """

    index: int
    url: str
    relpath: str
    stamp: str | None
    training: bool


@dataclass(frozen=True)
class Need:
    """What is still missing for one image: plain features and/or distorted variant numbers."""

    plain: bool
    variants: tuple[int, ...] = ()

    @property
    def nothing(self) -> bool:
        """Whether the cache already has everything."""
        return not self.plain and not self.variants


#: Given a task and the content key of its bytes, what must be computed.
NeedFn = Callable[[Task, str], Need]


class NeedTest(Protocol):
    """The cache's need test (:class:`lastlayer.bottlenecks.needs.CacheNeed`) as engines see it."""

    def __call__(self, task: Task, content: str) -> Need: ...

    def portable(self) -> NeedFn:
        """A picklable copy of the test, for engines that run it on other machines."""
        ...


@dataclass
class Result:
    """What an engine found for one task.

    Attributes:
        task: the task.
        content: SHA-256 hex of the image bytes.
        plain: ``float32 [D]`` plain features (``float16`` activations with ``--train_top``), when they
            were needed and the image decoded.
        variants: distorted variant number to ``float32 [D]`` (or ``float16``).
        error: why the image could not be decoded, or ``None``.
        stored: feature vectors (plain and variants) the engine computed and wrote to the cache
            itself (:attr:`Engine.writes_cache`); such a result carries no features.
    """

    task: Task
    content: str
    plain: np.ndarray | None = None
    variants: dict[int, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    stored: int = 0

    @property
    def computed(self) -> bool:
        """Whether the network ran for this image."""
        return self.plain is not None or bool(self.variants) or self.stored > 0

    def rows(self) -> tuple[list[Row], list[Row]]:
        """The cache rows of this result: for the plain folder (features, the decode error, or, for an
        image whose content was already cached, a record of its path and stamp) and for the
        distorted variants' folder."""
        from lastlayer.bottlenecks.parts import Row

        task = self.task
        plain: list[Row] = []
        if not self.content:
            return plain, []
        if self.plain is not None or self.error is not None:
            plain.append(Row(self.content, 0, task.relpath, task.stamp, self.plain, self.error))
        elif task.stamp is not None:
            plain.append(Row(self.content, 0, task.relpath, task.stamp, None, None))
        variants = [Row(self.content, v, task.relpath, None, vec, None) for v, vec in self.variants.items()]
        return plain, variants


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Engine(ABC):
    """Computes what the cache lacks for a list of tasks.

    An engine is a context manager: what it needs for a whole run (a Spark session) is started on
    enter, or at the latest on the first :meth:`extract`, and released on exit.

    Attributes:
        name: the ``--engine`` value that selects it.
        writes_cache: whether :meth:`extract` takes ``cache`` and writes the rows there itself, where
            it computes them; its results then carry no features (:attr:`Result.stored`).
    """

    name: ClassVar[str]
    writes_cache: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(
        cls, config: EngineConfig, storage_options: Mapping[str, Any] | None, spark_conf: Mapping[str, str]
    ) -> Engine:
        """The engine for ``config``; ``spark_conf`` holds cluster settings (Kerberos, Hadoop) for
        engines that start a JVM."""

    @abstractmethod
    def extract(
        self,
        tasks: Sequence[Task],
        model: FeatureModel,
        need: NeedTest,
        distortions: Distortions,
        progress: Callable[[int], None] | None = None,
        cache: CacheFolders | None = None,
    ) -> Iterator[Result]:
        """Compute what ``need`` asks for, for each task; yield one :class:`Result` per task.

        Args:
            progress: called with the number of tasks finished so far.
            cache: for an engine that :attr:`writes_cache`: where it writes each result's rows, in
                part files, before it yields the result (others are not given it).
        """

    def close(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Release what the engine holds (nothing by default)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
