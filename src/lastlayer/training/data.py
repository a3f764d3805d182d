"""The training data: the usable images of each split, the fits of a run (the final one and the folds of
a cross-validation), and the pass over the cache that prepares them."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from lastlayer.bottlenecks import passes
from lastlayer.bottlenecks.extraction import Source, extract
from lastlayer.bottlenecks.parts import remove_damaged
from lastlayer.bottlenecks.passes import DamagedCache, Predictions, RowStore
from lastlayer.bottlenecks.store import LOAD_ATTEMPTS
from lastlayer.dataset import TESTING, TRAINING, VALIDATION, ImageSet
from lastlayer.errors import DataError
from lastlayer.training.top import TopNet, derive, exported, train_top
from lastlayer.training.train import (
    Classifier,
    Evaluation,
    Standardizer,
    TrainConfig,
    draw_counts,
    train,
    validation_draws,
)

if TYPE_CHECKING:
    from lastlayer.bottlenecks.needs import Bottlenecks
    from lastlayer.engines.base import Engine
    from lastlayer.settings.run import TrainingConfig
    from lastlayer.zoo import Backbones
    from lastlayer.zoo.top import HeadConv

log = logging.getLogger("lastlayer.retrain")


def plan_variants(
    images: ImageSet,
    training: TrainingConfig,
    workers: int,
    seed: int,
    positions: np.ndarray | None = None,
) -> np.ndarray | None:
    """With distortions on: ``int64 [N]`` how often training will draw each image (replayed from the
    seeded sampler), so that only the distorted variants it draws are computed. ``None`` (every
    variant) without distortions, or when several workers share the work without ``--random_seed``
    (each would draw its own seed, hence its own plan).

    Args:
        workers: ``--worker_count``.
        positions: the positions of the training images training will draw from (default: every
            training image; :func:`load` plans again without those found unusable).
    """
    if not training.distortions.enabled:
        return None
    if workers > 1 and training.random_seed is None:
        return None
    positions = images.indices(TRAINING) if positions is None else positions
    labels = images.label_index[positions].astype(np.int64)
    draws = np.zeros(len(images.files), np.int64)
    draws[positions] = draw_counts(labels, len(images.labels), train_config(training, seed))
    return draws


def load(
    images: ImageSet,
    model: Backbones,
    engine: Engine,
    source: Source,
    bottlenecks: Bottlenecks,
    draws: np.ndarray | None,
    training: TrainingConfig,
    seed: int,
) -> TrainingData:
    """The training data, its pass before training done (:meth:`TrainingData.prepare`) for the final
    fit and the folds of ``--cross_validation``.

    Goes back to extraction, computing everything missing itself (even other workers' shares), when
    that pass finds a cache file damaged (removed: its images are computed again) or gone (another
    process merged it), up to :data:`~.store.LOAD_ATTEMPTS` times; and, with distortions on,
    when training images found unusable change what training draws (planned again without them).

    Raises:
        DataError: a class has no usable training image, fewer images than folds, or the cache kept
            changing under the run.
    """
    computed, damaged, attempts = bottlenecks.computed, bottlenecks.damaged_files, 0
    planned = images.indices(TRAINING)
    whole = source.whole()
    while True:
        data = TrainingData.of(images, bottlenecks)
        if draws is not None and not np.array_equal(planned, data.index[TRAINING]):
            planned = data.index[TRAINING]
            draws = plan_variants(images, training, source.shard[1], seed, planned)
        else:
            try:
                data.prepare([final_fit(data, training, seed), *fold_fits(data, training, seed)[0]])
                break
            except DamagedCache as exc:
                attempts += 1
                damaged += _forget(exc, source, attempts)
        bottlenecks = extract(images, model, engine, whole, None, draws)
        computed += bottlenecks.computed
        damaged += bottlenecks.damaged_files
    found = len(images.files) - len(bottlenecks.skipped) - bottlenecks.pending
    cache = replace(bottlenecks, computed=computed, reused=found - computed, damaged_files=damaged)
    head = model.models[0].head
    return (
        replace(data, bottlenecks=cache)
        if head is None
        else _with_top(replace(data, bottlenecks=cache), head, training, seed)
    )


def _with_top(data: TrainingData, head: HeadConv, training: TrainingConfig, seed: int) -> TrainingData:
    """``--train_top=head``: train the head convolution on the cached activations of ``data``
    (:func:`~lastlayer.training.top.train_top`), and the training data of its features instead
    (written to a temporary folder, removed by :meth:`TrainingData.close`), prepared as :func:`load`'s."""
    fit = final_fit(data, training, seed)
    with data:
        standardizer, train_x, _ = data.feeds(fit)
        net = train_top(head, train_x, fit.labels, data.classes, fit.config, standardizer)
        folder = tempfile.mkdtemp(prefix="lastlayer-top-")
        try:
            derived = derive(data.bottlenecks, net, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    out = TrainingData(data.index, data.labels, derived, data.classes, top_net=net, scratch=folder)
    out.prepare([final_fit(out, training, seed), *fold_fits(out, training, seed)[0]])
    return out


def _forget(exc: DamagedCache, source: Source, attempts: int) -> int:
    """Remove the damaged files of ``exc`` (their images are computed again); how many.

    Raises:
        DataError: this was the :data:`~lastlayer.bottlenecks.store.LOAD_ATTEMPTS` th attempt.
    """
    if attempts >= LOAD_ATTEMPTS:
        raise DataError(
            f"the bottleneck cache in {source.bottleneck_dir} changed {attempts} times while this run "
            f"read it ({exc}): run again once the other runs sharing it are done"
        ) from exc
    damaged = [part for part in exc.parts if not part.vanished]
    for part in damaged:
        remove_damaged(part.url, source.storage_options)
    return len(damaged)


@dataclass(frozen=True)
class Fit:
    """One training of the last layer: its training and validation images and its settings.

    Attributes:
        name: ``"final"``, or ``"fold F"`` of a cross-validation.
        positions: ``int64 [n]`` its training images (positions in the image set, the order its
            sampler draws from).
        labels: ``int64 [n]`` their classes.
        val_positions, val_labels: its validation images, likewise.
        config: its settings.
    """

    name: str
    positions: np.ndarray
    labels: np.ndarray
    val_positions: np.ndarray
    val_labels: np.ndarray
    config: TrainConfig

    @property
    def key(self) -> tuple[str, TrainConfig]:
        """What tells it apart from the other fits of a run."""
        return self.name, self.config


def final_fit(data: TrainingData, training: TrainingConfig, seed: int) -> Fit:
    """The training of the model the run exports: on the training split, validated on the validation
    split."""
    return Fit(
        "final",
        data.index[TRAINING],
        data.labels[TRAINING],
        data.index[VALIDATION],
        data.labels[VALIDATION],
        train_config(training, seed),
    )


def fold_fits(
    data: TrainingData, training: TrainingConfig, seed: int
) -> tuple[list[Fit], np.ndarray, np.ndarray, np.ndarray]:
    """The trainings of ``--cross_validation K`` (none without it), each on every image with features
    but one stratified, seeded fold; and the images, their classes and the fold of each.

    Raises:
        DataError: fewer such images than folds.
    """
    k = training.cross_validation
    positions = np.concatenate([data.index[s] for s in (TRAINING, VALIDATION, TESTING)])
    truth = np.concatenate([data.labels[s] for s in (TRAINING, VALIDATION, TESTING)])
    if not k:
        return [], positions[:0], truth[:0], truth[:0]
    kept = data.bottlenecks.first_rows(positions) >= 0  # (with distortions: the images training draws)
    positions, truth = positions[kept], truth[kept]
    if len(truth) < k:
        raise DataError(
            f"--cross_validation={k} needs at least {k} usable images, and there are {len(truth)}: "
            "lower --cross_validation or add images"
        )
    fold_of = folds(truth, k, seed)
    config = train_config(training, seed, log_steps=False)
    none = np.zeros(0, np.int64)
    fits = [
        Fit(f"fold {f}", positions[fold_of != f], truth[fold_of != f], none, none, config) for f in range(k)
    ]
    return fits, positions, truth, fold_of


def train_config(training: TrainingConfig, seed: int, log_steps: bool = True) -> TrainConfig:
    """The settings of :func:`~lastlayer.training.train.train` for ``training`` and ``seed``."""
    t = training
    return TrainConfig(
        t.how_many_training_steps,
        t.learning_rate,
        t.train_batch_size,
        t.eval_step_interval,
        t.validation_batch_size,
        seed,
        t.balance_classes,
        log_steps,
    )


@dataclass(frozen=True)
class TrainingData:
    """The usable images of each split as positions into the image set, their labels, and where
    their features are; once :meth:`prepare` d, the statistics and gathered rows of its fits.

    Attributes:
        index: split to ``int64 [N_split]`` positions in :attr:`ImageSet.files`.
        labels: split to ``int64 [N_split]`` class indices.
        classes: the number of classes C.
        top_net: with ``--train_top=head``, the trained top whose features these are, else None.
        scratch: the temporary folder of those features, removed by :meth:`close`.
    """

    index: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    bottlenecks: Bottlenecks
    classes: int
    top_net: TopNet | None = field(default=None, compare=False, repr=False)
    scratch: str | None = None
    _prepared: dict[tuple[str, TrainConfig], tuple[Standardizer, RowStore]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def of(cls, images: ImageSet, bottlenecks: Bottlenecks) -> TrainingData:
        """The usable images of ``images``; every class must have training images.

        Raises:
            DataError: a class has no usable training image.
        """
        index = {
            split: images.indices(split)[bottlenecks.usable[images.indices(split)]]
            for split in (TRAINING, VALIDATION, TESTING)
        }
        labels = {split: images.label_index[idx].astype(np.int64) for split, idx in index.items()}
        data = cls(index, labels, bottlenecks, len(images.labels))
        present = set(data.labels[TRAINING].tolist())
        if images.multi_hot is not None:  # a label may be no image's first
            present = set(np.flatnonzero(images.multi_hot[index[TRAINING]].any(axis=0)).tolist())
        missing = [label for i, label in enumerate(images.labels) if i not in present]
        if missing:
            raise DataError(
                f"class(es) {', '.join(repr(m) for m in missing)} have no usable training images: add images "
                "or lower --testing_percentage / --validation_percentage"
            )
        return data

    def prepare(self, fits: list[Fit]) -> None:
        """The pass before training (:func:`~lastlayer.bottlenecks.passes.load`) for those of ``fits``
        not prepared yet: each one's standardizer, from the rows that stand for its training images
        (grouped by which fits each image belongs to), the rows its draws and validation batches will
        read, and a check of every file the evaluations will read.

        Raises:
            DamagedCache: a file is damaged or gone.
        """
        todo = [f for f in fits if f.key not in self._prepared]
        if not todo:
            return
        b = self.bottlenecks
        images = np.unique(np.concatenate([f.positions for f in todo]))
        member = np.packbits(np.stack([np.isin(images, f.positions) for f in todo], axis=1), axis=1)
        groups, group_of = np.unique(member, axis=0, return_inverse=True)
        ids, owner = b.representation(images)
        gather = np.concatenate([self._read_by(f) for f in todo])
        usable = np.concatenate(list(self.index.values()))
        check = b.first_rows(usable)
        statistics = (ids, group_of.reshape(-1)[owner], len(groups))
        moments, store = passes.load(b, statistics, gather, check[check >= 0])
        belongs = np.unpackbits(groups, axis=1)
        for j, fit in enumerate(todo):
            mean, std = moments.merged(np.flatnonzero(belongs[:, j]).tolist())
            self._prepared[fit.key] = (Standardizer.from_statistics(mean, std), store)

    def _read_by(self, fit: Fit) -> np.ndarray:
        """The ids of the rows training ``fit`` reads: every row standing for an image it draws, and
        the validation images of its batches."""
        drawn = draw_counts(fit.labels, self.classes, fit.config) > 0
        ids, _ = self.bottlenecks.representation(fit.positions[drawn])
        scored = np.unique(validation_draws(fit.val_labels, self.classes, fit.config))
        return np.concatenate([ids, fit.val_positions[scored]])

    def train(
        self,
        fit: Fit,
        on_eval: Callable[[Evaluation], None] | None = None,
        on_checkpoint: Callable[[int, Classifier], None] | None = None,
    ) -> Classifier:
        """:func:`~lastlayer.training.train.train` for ``fit``, on the rows :meth:`prepare` gathered,
        standardized with its training images' statistics."""
        standardizer, train_x, val_x = self.feeds(fit)
        return train(
            train_x,
            fit.labels,
            val_x,
            fit.val_labels,
            self.bottlenecks.dim,
            self.classes,
            fit.config,
            on_eval,
            on_checkpoint,
            standardizer,
        )

    def feeds(
        self, fit: Fit
    ) -> tuple[
        Standardizer,
        Callable[[np.ndarray, np.random.Generator], np.ndarray],
        Callable[[np.ndarray], np.ndarray],
    ]:
        """What training ``fit`` reads, once :meth:`prepare` d: its standardizer, the features of
        training positions ``[B]`` (a variant each with distortions on) and of validation positions."""
        self.prepare([fit])
        standardizer, store = self._prepared[fit.key]
        return standardizer, self._sampler(fit, store), lambda pos: store.get(fit.val_positions[pos])

    def _sampler(self, fit: Fit, store: RowStore) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
        """Features of training positions ``[B]`` → ``float32 [B, D]``: with distortions on, one of
        the image's cached distorted variants at random (its plain features when it has none), else
        the plain features."""
        b, images = self.bottlenecks, fit.positions
        if not len(b.variant_images):
            return lambda pos, rng: store.get(images[pos])
        start, count = b.variant_range(images)
        n = len(b.plain)

        def sample(pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            k = (rng.random(len(pos)) * count[pos]).astype(np.int64)
            return store.get(np.where(count[pos] > 0, n + start[pos] + k, images[pos]))

        return sample

    def predict(
        self, classifiers: list[Classifier], positions: np.ndarray, truth: np.ndarray, which: np.ndarray
    ) -> Predictions:
        """What ``classifiers[which[i]]`` says of the image at ``positions[i]`` (of class ``truth[i]``),
        from the first row standing for it (its plain features, or with distortions on, a training
        image's first variant); every image must have one."""
        ids = self.bottlenecks.first_rows(positions)
        return passes.predict(self.bottlenecks, ids, classifiers, which, truth)

    def close(self) -> None:
        """Remove the gathered rows' temporary files (and the trained top's features)."""
        for _, store in self._prepared.values():
            store.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def exported(self, network: Backbones) -> Backbones:
        """The network(s) the exported model carries: ``network``, with the trained head's weights in
        place when there is a trained top (:func:`~lastlayer.training.top.exported`)."""
        return network if self.top_net is None else exported(network, self.top_net)

    def __enter__(self) -> TrainingData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``int64 [N]`` fold (0..k-1) of each position: each class dealt out in turn over a seeded
    shuffle, so every fold has each class's share (stratified)."""
    rng = np.random.default_rng([seed, k])
    out = np.empty(len(labels), np.int64)
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (start + np.arange(len(members))) % k
        start += len(members)
    return out
