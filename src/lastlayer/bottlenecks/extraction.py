"""Extraction: each network's bottlenecks of a worker's shard, from the cache or computed by an engine,
and worker 0's wait for the other workers' shards."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer.bottlenecks.needs import Bottlenecks, combine, compute_bottlenecks
from lastlayer.errors import DataError
from lastlayer.preprocess import Distortions

if TYPE_CHECKING:
    from lastlayer.dataset import ImageSet
    from lastlayer.engines.base import Engine
    from lastlayer.zoo import Backbones, FeatureModel

#: The run's lines keep the logger name they always had (``INFO:lastlayer.retrain:Bottlenecks: ...``).
log = logging.getLogger("lastlayer.retrain")

#: ``(done, total)`` images while bottlenecks are computed.
Progress = Callable[[int, int], None]
#: Seconds between looks at the cache while worker 0 waits for the other workers' shards.
SHARD_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class Source:
    """Where a run's bottlenecks are cached and which of them this worker computes.

    Attributes:
        bottleneck_dir: the cache folder (``--bottleneck_dir``).
        distortions: the training distortions (their variants' folder and random streams).
        variants: distorted variants kept per training image (``--distorted_variants``).
        shard: ``(worker_index, worker_count)``: this worker computes only its shard.
        storage_options: for the cache and the images.
    """

    bottleneck_dir: str
    distortions: Distortions
    variants: int
    shard: tuple[int, int] = (0, 1)
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def whole(self) -> Source:
        """The same, computing every image (even the other workers' shares)."""
        return replace(self, shard=(0, 1))


def extract(
    images: ImageSet,
    model: Backbones,
    engine: Engine,
    source: Source,
    progress: Progress | None = None,
    draws: np.ndarray | None = None,
) -> Bottlenecks:
    """The bottlenecks of this worker's shard, each network's from its cache, else computed by
    ``engine``; several networks' side by side (:func:`~lastlayer.bottlenecks.needs.combine`)."""
    parts = []
    for branch in model:
        part = _bottlenecks(images, branch, engine, source, progress, draws)
        log.info(
            "Bottlenecks: %d computed, %d from the cache, %d skipped%s",
            part.computed,
            part.reused,
            len(part.skipped),
            f" ({branch.architecture})" if len(model) > 1 else "",
        )
        parts.append(part)
    return combine(parts)


def _bottlenecks(
    images: ImageSet,
    model: FeatureModel,
    engine: Engine,
    source: Source,
    progress: Progress | None,
    draws: np.ndarray | None,
) -> Bottlenecks:
    return compute_bottlenecks(
        images,
        model,
        source.bottleneck_dir,
        engine,
        distortions=source.distortions,
        variants=source.variants,
        draws=draws,
        storage_options=source.storage_options,
        progress=progress,
        shard=source.shard,
    )


def wait_for_shards(
    images: ImageSet,
    model: Backbones,
    engine: Engine,
    source: Source,
    bottlenecks: Bottlenecks,
    wait_s: float,
    draws: np.ndarray | None = None,
) -> Bottlenecks:
    """Worker 0: look at the cache every :data:`SHARD_POLL_SECONDS` until the other workers' shards
    are in it; at most ``wait_s`` (``--shard_wait_seconds``).

    Raises:
        DataError: the shards did not arrive in time.
    """
    deadline = time.monotonic() + wait_s
    while bottlenecks.pending:
        if time.monotonic() > deadline:
            raise DataError(
                f"{bottlenecks.pending} images of other workers' shards are still not in "
                f"{source.bottleneck_dir} after {wait_s:.0f} s: "
                "check the other workers' logs, then run again"
            )
        log.info(
            "Waiting for the other workers: %d images of their shards not cached yet", bottlenecks.pending
        )
        time.sleep(SHARD_POLL_SECONDS)
        bottlenecks = combine([_bottlenecks(images, branch, engine, source, None, draws) for branch in model])
    return bottlenecks
