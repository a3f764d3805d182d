"""Bottlenecks for an image set: what the cache has, what an engine must compute, and where each
image's features are.

:func:`compute_bottlenecks` returns where in the cache each image's features are (their locations,
:func:`~lastlayer.bottlenecks.parts.pack`) and each cache folder's
:class:`~lastlayer.bottlenecks.parts.FeatureSource`, not the features: the passes of
:mod:`lastlayer.bottlenecks.passes` read them a part file at a time, so no feature matrix is ever held.
:func:`combine` joins the bottlenecks of several networks (an ensemble): an image's features are then
every network's side by side.

With distortions on, a training image needs at most ``variants`` distorted variants, and only as many
as training will draw it (``draws``, replayed from the seeded sampler by
:func:`lastlayer.training.train.draw_counts`); its plain features are not computed (training, the
standardization statistics, the training split's accuracy and cross-validation use its variants), and
an image training never draws is not even read. The network passes are at most ``min(steps x batch
size, variants x training images)`` plus one per validation and test image, never more than
retrain.py's one pass per drawn image plus its plain passes of the validation and test images.

Rows of features are named by *ids*: ``i < N`` is the plain features of image ``i``, ``N + k`` the
``k``-th distorted variant of :attr:`Bottlenecks.variant_images`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

import numpy as np

from lastlayer import storage
from lastlayer.bottlenecks.keys import CachedKeys, ContentKeys
from lastlayer.bottlenecks.parts import FeatureSource
from lastlayer.bottlenecks.staging import CacheFolders
from lastlayer.bottlenecks.store import FeatureStore
from lastlayer.dataset import SPLITS, TRAINING, ImageFile, ImageSet
from lastlayer.engines import batch
from lastlayer.engines.base import Engine, Need, Result, Task
from lastlayer.preprocess import NO_DISTORTIONS, Distortions

if TYPE_CHECKING:  # (Spark's workers unpickle a CacheNeed: the zoo and onnx would cost them ~1 s)
    from lastlayer.zoo import FeatureModel

#: The logger name its lines always had (``lastlayer.features``), whatever the module's name.
log = logging.getLogger("lastlayer.features")


@dataclass
class Bottlenecks:
    """Where the features of every image of an :class:`ImageSet` are in the cache, for B networks
    (one, unless an ensemble).

    Attributes:
        sources: each network's plain features.
        variant_sources: each network's distorted variants (empty without distortions).
        plain: ``int64 [N, B]`` location of each image's plain features, -1 where it has none (an
            image that could not be used, or a training image with distortions on).
        variant_images: ``int64 [M]`` the image of each distorted variant, sorted (an image's
            variants in the order of their numbers).
        variants: ``int64 [M, B]`` the variants' locations.
        usable: ``bool [N]`` images that training may use (neither skipped nor pending).
        skipped: ``(relative path, reason)`` of each image that could not be used.
        computed: images decoded and run through the network in this call.
        reused: usable images whose features all came from the cache (or that need none).
        damaged_files: cache files found damaged (and recomputed).
        pending: images of other shards that are not in the cache yet.
    """

    sources: tuple[FeatureSource, ...]
    variant_sources: tuple[FeatureSource, ...]
    plain: np.ndarray
    variant_images: np.ndarray
    variants: np.ndarray
    usable: np.ndarray
    skipped: list[tuple[str, str]]
    computed: int
    reused: int
    damaged_files: int
    pending: int = 0

    @property
    def dim(self) -> int:
        """Feature size D: every network's side by side."""
        return sum(s.dim for s in self.sources)

    def variant_range(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``int64``: the first variant (index into :attr:`variants`) of each image at ``positions``,
        and how many it has."""
        start = np.searchsorted(self.variant_images, positions)
        return start, np.searchsorted(self.variant_images, positions, "right") - start

    def representation(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the rows that stand for the images at ``positions`` in training: each image's
        distorted variants, or its plain features when it has none (nothing when it has neither);
        and for each id, the index in ``positions`` of its image."""
        start, count = self.variant_range(positions)
        plain = (count == 0) & (self.plain[positions, 0] >= 0)
        per = np.where(plain, 1, count)
        owner = np.repeat(np.arange(len(positions)), per)
        ordinal = np.arange(len(owner)) - np.repeat(np.cumsum(per) - per, per)
        ids = np.where(plain[owner], positions[owner], len(self.plain) + start[owner] + ordinal)
        return ids.astype(np.int64), owner

    def first_rows(self, positions: np.ndarray) -> np.ndarray:
        """``int64``: the id of the first row that stands for each image at ``positions`` (its first
        variant, else its plain features), -1 for an image with neither."""
        start, count = self.variant_range(positions)
        plain = np.where(self.plain[positions, 0] >= 0, positions, -1)
        return np.where(count > 0, len(self.plain) + start, plain)

    def locations(self, ids: np.ndarray) -> np.ndarray:
        """``int64 [n, B]``: where the rows ``ids`` are, in :attr:`sources` (plain) or
        :attr:`variant_sources` (variants)."""
        n = len(self.plain)
        out = np.empty((len(ids), len(self.sources)), np.int64)
        plain = ids < n
        out[plain] = self.plain[ids[plain]]
        out[~plain] = self.variants[ids[~plain] - n]
        return out

    def read(self, ids: np.ndarray) -> np.ndarray:
        """``float32 [n, D]``: the features of the rows ``ids`` (read at once: for a few rows; passes
        over many go through :mod:`lastlayer.bottlenecks.passes`)."""
        locations, plain = self.locations(ids), ids < len(self.plain)
        blocks = []
        for b, source in enumerate(self.sources):
            block = np.zeros((len(ids), source.dim), np.float32)
            block[plain] = source.rows(locations[plain, b])
            if (~plain).any():
                block[~plain] = self.variant_sources[b].rows(locations[~plain, b])
            blocks.append(block)
        return np.hstack(blocks)


class KeyLookup(Protocol):
    """What the need test asks of a cache folder: a :class:`FeatureStore` or its :class:`CachedKeys`."""

    def has(self, content: str, variant: int = 0) -> bool: ...

    def has_many(self, contents: np.ndarray, variant: int = 0) -> np.ndarray: ...

    def error(self, content: str) -> str | None: ...

    def failed_many(self, contents: np.ndarray) -> np.ndarray: ...

    def keys(self) -> CachedKeys: ...


@dataclass(frozen=True)
class CacheNeed:
    """The need test of the cache: what an image with these bytes still lacks.

    Over live stores for the local engine; over :meth:`FeatureStore.keys` copies (picklable) for
    engines that run it on other machines. With distortions on, a training image needs its wanted
    variants and no plain features.

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

    def wanted_many(self, positions: np.ndarray) -> np.ndarray:
        """``int64 [K]``: :meth:`wanted` for the training images at ``positions``."""
        if self.draws is None:
            return np.full(len(positions), self.variants, np.int64)
        return np.minimum(self.variants, self.draws[positions])

    def idle(self, training: np.ndarray) -> np.ndarray:
        """``bool [N]``: the images that need nothing whatever their bytes (with distortions on, the
        training images that training never draws), given ``training`` ``bool [N]``."""
        if self.distorted is None or self.draws is None:
            return np.zeros(len(training), bool)
        return training & (self.draws == 0)

    def __call__(self, task: Task, content: str) -> Need:
        if self.plain.error(content) is not None:
            return Need(False)
        if self.distorted is not None and task.training:
            wanted = range(self.wanted(task.index))
            return Need(False, tuple(v for v in wanted if not self.distorted.has(content, v)))
        return Need(not self.plain.has(content))

    def complete(self, contents: np.ndarray, training: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``bool [K]``: where, for the ``V32 [K]`` content keys of the images at ``positions`` whose
        training flags are ``training``, :meth:`__call__` would surely ask for nothing (the same test
        for many images at once; where it says ``False``, ask :meth:`__call__`)."""
        if self.distorted is None:
            return self.plain.has_many(contents, 0)
        done = training | self.plain.has_many(contents, 0)
        wanted = self.wanted_many(positions)
        for v in range(self.variants):
            done &= ~(training & (wanted > v)) | self.distorted.has_many(contents, v)
        return done | self.plain.failed_many(contents)

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
    """Find ``images`` in the cache and compute what it lacks with ``engine``.

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
    at once, and those that need nothing whatever their bytes are left out; the per-image test runs
    for the others."""
    contents = plain.contents_for_many(images.relpaths, images.stamps)
    training = images.split_index == SPLITS.index(TRAINING)
    idle = need.idle(training)
    known = np.flatnonzero(contents.known & ~idle)
    complete = need.complete(contents.keys[known], training[known], known)
    unsure = np.sort(np.concatenate([np.flatnonzero(~contents.known & ~idle), known[~complete]]))
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
    """Where each image's features are (only the variants wanted, no plain features of a training
    image with distortions on), and what was skipped."""
    training = images.split_index == SPLITS.index(TRAINING)
    idle = need.idle(training)
    failed = contents.known & plain.failed_many(contents.keys)
    distorting = training if distorted is not None else np.zeros(len(training), bool)
    wanting = contents.known & ~failed & ~pending & distorting & ~idle
    variant_images, variant_locations = _variants(distorted, need, contents, wanting)
    where, found = plain.locations(contents.keys)
    lost = np.where(distorting, wanting & (np.bincount(variant_images, minlength=len(training)) == 0), ~found)
    # an image known to be unusable stays skipped when training no longer draws it
    skipped_at = np.flatnonzero(~pending & (failed | (~idle & (~contents.known | lost))))
    skipped: list[tuple[str, str]] = []
    for i, f in zip(skipped_at.tolist(), images.files.at(skipped_at), strict=True):
        content = contents[i]  # (lost: only when a file vanished while the run read the cache)
        reason = batch.VANISHED if content is None else plain.error(content) or "not in the cache"
        skipped.append((f.relpath, reason))
        log.warning("Skipped %s: %s", f.url, reason)
    usable = ~pending
    usable[skipped_at] = False
    keep = usable[variant_images]
    variant_images, variant_locations = variant_images[keep], variant_locations[keep]
    locations = np.where(usable & ~distorting & found, where, -1)
    return Bottlenecks(
        sources=(plain.source(),),
        variant_sources=() if distorted is None else (distorted.source(),),
        plain=locations[:, None],
        variant_images=variant_images,
        variants=variant_locations[:, None],
        usable=usable,
        skipped=skipped,
        computed=computed,
        reused=len(images.files) - len(skipped) - int(pending.sum()) - computed,
        damaged_files=plain.damaged + (distorted.damaged if distorted is not None else 0),
        pending=int(pending.sum()),
    )


def _variants(
    distorted: FeatureStore | None, need: CacheNeed, contents: ContentKeys, wanting: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The images (``wanting``, ``bool [N]``) of each wanted variant found in the store, sorted, and
    its location."""
    if distorted is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    at = np.flatnonzero(wanting)
    wanted = need.wanted_many(at)
    table = np.full((len(at), need.variants), -1, np.int64)
    for v in range(need.variants):
        where, found = distorted.locations(contents.keys[at], v)
        table[:, v] = np.where(found & (wanted > v), where, -1)
    present = table >= 0
    return np.repeat(at, present.sum(axis=1)), table[present]


def combine(parts: Sequence[Bottlenecks]) -> Bottlenecks:
    """The bottlenecks of an ensemble: each image's features of every network side by side.

    An image is usable when every network could use it; its plain features are there when every
    network has them, and so is each of its first k variants, k the fewest any network has. One part
    is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    usable = np.logical_and.reduce([p.usable for p in parts])
    plain = np.hstack([p.plain for p in parts])
    plain[~(usable & (plain >= 0).all(axis=1))] = -1
    counts = []
    for p in parts:
        count = np.bincount(p.variant_images, minlength=len(usable))
        counts.append(np.where(usable, count, 0))
    fewest = np.minimum.reduce(counts)
    images = np.repeat(np.arange(len(usable)), fewest)
    ordinal = np.arange(len(images)) - np.repeat(np.cumsum(fewest) - fewest, fewest)
    variants = np.hstack([p.variants[np.searchsorted(p.variant_images, images) + ordinal] for p in parts])
    skipped: dict[str, str] = {}
    for part in parts:
        for path, reason in part.skipped:
            skipped.setdefault(path, reason)
    computed = max(p.computed for p in parts)
    pending = max(p.pending for p in parts)
    return Bottlenecks(
        sources=tuple(s for p in parts for s in p.sources),
        variant_sources=tuple(s for p in parts for s in p.variant_sources),
        plain=plain,
        variant_images=images,
        variants=variants,
        usable=usable,
        skipped=list(skipped.items()),
        computed=computed,
        reused=len(usable) - len(skipped) - pending - computed,
        damaged_files=sum(p.damaged_files for p in parts),
        pending=pending,
    )
