"""Bottlenecks for an image set: what the cache has, what an engine must compute, and the result.

:func:`compute_bottlenecks` returns row indices into the cache's feature matrices rather than copies,
so the feature matrix exists once in memory; :func:`combine` joins the bottlenecks of several
networks (an ensemble) into one matrix.

With distortions on, a training image needs at most ``variants`` distorted variants, and only as many
as training will draw it (``draws``, replayed from the seeded sampler by
:func:`lastlayer.train.draw_counts`): the network passes are at most ``min(steps x batch size,
variants x training images)``, never more than retrain.py's one pass per drawn image.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import numpy as np

from lastlayer import storage
from lastlayer.cache import CachedKeys, CacheFolders, ContentKeys, FeatureStore
from lastlayer.dataset import SPLITS, TRAINING, ImageFile, ImageSet
from lastlayer.engines import local
from lastlayer.engines.base import Engine, Need, Result, Task
from lastlayer.preprocess import NO_DISTORTIONS, Distortions
from lastlayer.zoo import FeatureModel

log = logging.getLogger(__name__)


@dataclass
class Bottlenecks:
    """Features of every image of an :class:`ImageSet`, by reference into the cache.

    Attributes:
        plain: ``float32 [M, D]`` plain feature matrix of the cache.
        rows: ``int64 [N]`` row in ``plain`` of each image, -1 for an image that could not be used.
        distorted: ``float32 [M', D]`` distorted-variant matrix, or ``None`` without distortions.
        variant_rows: ``int64 [N, V]`` rows in ``distorted`` (-1 for non-training images), or ``None``.
        skipped: ``(relative path, reason)`` of each image that could not be used.
        computed: images decoded and run through the network in this call.
        reused: usable images whose features all came from the cache.
        damaged_files: cache files found damaged (and recomputed).
        pending: images of other shards that are not in the cache yet (their rows are -1).
    """

    plain: np.ndarray
    rows: np.ndarray
    distorted: np.ndarray | None
    variant_rows: np.ndarray | None
    skipped: list[tuple[str, str]]
    computed: int
    reused: int
    damaged_files: int
    pending: int = 0


class KeyLookup(Protocol):
    """What the need test asks of a cache folder: a :class:`FeatureStore` or its :class:`CachedKeys`."""

    def has(self, content: str, variant: int = 0) -> bool: ...

    def has_many(self, contents: np.ndarray, variant: int = 0) -> np.ndarray: ...

    def error(self, content: str) -> str | None: ...

    def keys(self) -> CachedKeys: ...


@dataclass(frozen=True)
class CacheNeed:
    """The need test of the cache: what an image with these bytes still lacks.

    Over live stores for the local engine; over :meth:`FeatureStore.keys` copies (picklable) for
    engines that run it on other machines.

    Attributes:
        plain: the plain features' folder.
        distorted: the distorted variants' folder, or ``None`` without distortions.
        variants: distorted variants wanted at most per training image.
        draws: ``int64 [N]`` how often training draws each image (by position in the image set), or
            ``None`` for ``variants`` each.
    """

    plain: KeyLookup
    distorted: KeyLookup | None
    variants: int
    draws: np.ndarray | None = field(default=None, compare=False)

    def wanted(self, index: int) -> int:
        """Distorted variants wanted for the training image at position ``index``."""
        return self.variants if self.draws is None else min(self.variants, int(self.draws[index]))

    def __call__(self, task: Task, content: str) -> Need:
        if self.plain.error(content) is not None:
            return Need(False)
        missing: tuple[int, ...] = ()
        if self.distorted is not None and task.training:
            missing = tuple(v for v in range(self.wanted(task.index)) if not self.distorted.has(content, v))
        return Need(not self.plain.has(content), missing)

    def complete(self, contents: np.ndarray, training: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``bool [K]``: where, for the ``V32 [K]`` content keys of the images at ``positions`` whose
        training flags are ``training``, :meth:`__call__` would surely ask for nothing (the same test
        for many images at once; where it says ``False``, ask :meth:`__call__`)."""
        done = self.plain.has_many(contents, 0)
        if self.distorted is not None:
            wanted = (
                np.full(len(positions), self.variants)
                if self.draws is None
                else np.minimum(self.variants, self.draws[positions])
            )
            for v in range(self.variants):
                done &= ~(training & (wanted > v)) | self.distorted.has_many(contents, v)
        return done

    def portable(self) -> CacheNeed:
        """The same test over picklable copies of the stores' keys (for Spark executors)."""
        return CacheNeed(
            self.plain.keys(),
            None if self.distorted is None else self.distorted.keys(),
            self.variants,
            self.draws,
        )


def _save_what_was_computed(*stores: FeatureStore | None) -> None:
    """On a failed run, write what was computed so that a re-run resumes (best effort)."""
    for store in stores:
        if store is None:
            continue
        try:
            store.flush()
        except Exception as exc:  # the run's own error is the one to report
            log.warning("could not save the bottlenecks computed so far in %s: %s", store.url, exc)


def in_shard(relpath: str, shard: tuple[int, int]) -> bool:
    """Whether the image at ``relpath`` belongs to shard ``(index, count)`` (by a hash of the path)."""
    index, count = shard
    return count <= 1 or int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % count == index


def distortion_key(distortions: Distortions) -> str:
    """Name of the cache folder of one distortion setting."""
    return "distorted-" + hashlib.sha256(distortions.to_json().encode()).hexdigest()[:16]


def compute_bottlenecks(
    images: ImageSet,
    model: FeatureModel,
    bottleneck_dir: str,
    engine: Engine,
    *,
    distortions: Distortions = NO_DISTORTIONS,
    variants: int = 1,
    draws: np.ndarray | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Bottlenecks:
    """Load cached features for ``images`` and compute the missing ones with ``engine``.

    Args:
        variants: distorted variants cached at most per training image (when distortions are on).
        draws: ``int64 [N]``: how often training draws each image; an image gets
            ``min(variants, draws)`` variants (default: ``variants`` each).
        progress: called with ``(done, total)`` images while computing.
        shard: ``(index, count)``: compute only the images of this shard (see :func:`in_shard`);
            missing images of other shards are counted in :attr:`Bottlenecks.pending`.
    """
    root = storage.join(bottleneck_dir, model.key[:16])
    plain = FeatureStore(root, model.feature_size, storage_options)
    distorted = (
        FeatureStore(storage.join(root, distortion_key(distortions)), model.feature_size, storage_options)
        if distortions.enabled
        else None
    )
    need = CacheNeed(plain, distorted, variants if distorted is not None else 0, draws)
    tasks, contents, pending = _plan(images, plain, need, shard)
    computed = 0
    if tasks:
        log.info(
            "Computing bottlenecks for %d of %d images (%s)",
            len(tasks),
            len(images.files),
            model.architecture,
        )
        report = None if progress is None else (lambda done: progress(done, len(tasks)))
        results = _extract(engine, tasks, model, need, distortions, report, plain, distorted)
        try:
            computed = _store(results, plain, distorted, contents)
        except BaseException:
            _save_what_was_computed(plain, distorted)
            raise
        for store in (plain, distorted):
            if store is not None:
                if engine.writes_cache:
                    store.refresh()
                store.flush()
                store.compact()
    return _assemble(images, plain, distorted, need, contents, pending, computed)


class Tasks(Sequence[Task]):
    """The tasks of the images of an :class:`ImageSet` at some positions, made when read (no
    :class:`Task` object per image waits in memory)."""

    def __init__(self, images: ImageSet, positions: np.ndarray) -> None:
        self.images, self.positions = images, positions

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, i: int) -> Task: ...
    @overload
    def __getitem__(self, i: slice) -> list[Task]: ...
    def __getitem__(self, i: int | slice) -> Task | list[Task]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        position = int(self.positions[i])
        return _task(position, self.images.files[position])

    def __iter__(self) -> Iterator[Task]:
        return map(_task, self.positions.tolist(), self.images.files.at(self.positions))


def _task(i: int, f: ImageFile) -> Task:
    return Task(i, f.url, f.relpath, f.stamp, f.split == TRAINING)


def _plan(
    images: ImageSet, plain: FeatureStore, need: CacheNeed, shard: tuple[int, int]
) -> tuple[Tasks, ContentKeys, np.ndarray]:
    """The tasks of this shard that lack something, each image's content key as far as the cache
    knows it, and ``bool [N]`` whether each is an image of other shards that lacks something.

    The images whose path and stamp the cache knows and that lack nothing are found for all images
    at once; the per-image test runs for the others."""
    contents = plain.contents_for_many(images.relpaths, images.stamps)
    known = np.flatnonzero(contents.known)
    complete = need.complete(contents.keys[known], images.split_index[known] == SPLITS.index(TRAINING), known)
    unsure = np.sort(np.concatenate([np.flatnonzero(~contents.known), known[~complete]]))
    todo = np.zeros(len(images.files), bool)
    pending = np.zeros(len(images.files), bool)
    for i, f in zip(unsure.tolist(), images.files.at(unsure), strict=True):
        content = contents[i]
        if content is None or not need(_task(i, f), content).nothing:
            if in_shard(f.relpath, shard):
                todo[i] = True
            else:
                pending[i] = True
    return Tasks(images, np.flatnonzero(todo)), contents, pending


def _extract(
    engine: Engine,
    tasks: Tasks,
    model: FeatureModel,
    need: CacheNeed,
    distortions: Distortions,
    report: Callable[[int], None] | None,
    plain: FeatureStore,
    distorted: FeatureStore | None,
) -> Iterable[Result]:
    """The engine's results; an engine that writes the cache itself is told where."""
    if not engine.writes_cache:
        return engine.extract(tasks, model, need, distortions, report)
    folders = CacheFolders(
        plain.url, None if distorted is None else distorted.url, plain.dim, plain.storage_options
    )
    return engine.extract(tasks, model, need, distortions, report, cache=folders)


def _store(
    results: Iterable[Result], plain: FeatureStore, distorted: FeatureStore | None, contents: ContentKeys
) -> int:
    """Add the engine's results to the stores (unless the engine stored them); fill ``contents``;
    return the images computed."""
    computed = 0
    for result in results:
        contents[result.task.index] = result.content or None
        if not result.stored:
            plain_rows, variant_rows = result.rows()
            plain.add(plain_rows)
            if variant_rows and distorted is not None:
                distorted.add(variant_rows)
        computed += result.computed
    return computed


def _assemble(
    images: ImageSet,
    plain: FeatureStore,
    distorted: FeatureStore | None,
    need: CacheNeed,
    contents: ContentKeys,
    pending: np.ndarray,
    computed: int,
) -> Bottlenecks:
    """Row indices of every image into the stores' matrices (-1 past the variants wanted), and what
    was skipped."""
    rows = np.full(len(images.files), -1, np.int64)
    shape = (len(images.files), need.variants)
    variant_rows = np.full(shape, -1, np.int64) if distorted is not None else None
    skipped: list[tuple[str, str]] = []
    for i, (f, content) in enumerate(zip(images.files, contents, strict=True)):
        if pending[i]:
            continue
        reason = local.VANISHED if content is None else plain.error(content)
        if reason is not None or content is None:
            skipped.append((f.relpath, reason or "unknown"))
            log.warning("Skipped %s: %s", f.url, reason)
            continue
        rows[i] = plain.row(content)
        if variant_rows is not None and distorted is not None and f.split == TRAINING:
            for v in range(need.wanted(i)):
                variant_rows[i, v] = distorted.row(content, v)
    return Bottlenecks(
        plain=plain.features,
        rows=rows,
        distorted=None if distorted is None else distorted.features,
        variant_rows=variant_rows,
        skipped=skipped,
        computed=computed,
        reused=len(images.files) - len(skipped) - int(pending.sum()) - computed,
        damaged_files=plain.damaged + (distorted.damaged if distorted is not None else 0),
        pending=int(pending.sum()),
    )


def combine(parts: Sequence[Bottlenecks]) -> Bottlenecks:
    """The bottlenecks of an ensemble: each image's features of every network side by side.

    An image is usable when every network could use it; a distorted variant is there when every
    network has it. One part is returned as it is (no copy).
    """
    if len(parts) == 1:
        return parts[0]
    usable = np.logical_and.reduce([p.rows >= 0 for p in parts])
    rows = np.where(usable, np.cumsum(usable) - 1, -1)
    plain = np.hstack([p.plain[p.rows[usable]] for p in parts])
    distorted = variant_rows = None
    variants = [(p.distorted, p.variant_rows) for p in parts]
    if all(d is not None and v is not None for d, v in variants):
        present = np.logical_and.reduce([v >= 0 for _, v in variants])
        variant_rows = np.where(present, np.cumsum(present).reshape(present.shape) - 1, -1)
        distorted = np.hstack([d[v[present]] for d, v in variants])
    skipped: dict[str, str] = {}
    for part in parts:
        for path, reason in part.skipped:
            skipped.setdefault(path, reason)
    computed = max(p.computed for p in parts)
    pending = max(p.pending for p in parts)
    return Bottlenecks(
        plain=plain,
        rows=rows,
        distorted=distorted,
        variant_rows=variant_rows,
        skipped=list(skipped.items()),
        computed=computed,
        reused=len(rows) - len(skipped) - pending - computed,
        damaged_files=sum(p.damaged_files for p in parts),
        pending=pending,
    )
