"""Passes over the bottleneck cache in bounded memory.

Training never holds the feature matrix (10⁷ images x 1,280 floats would be 51 GB): every pass reads
the cache a part file at a time, in the order of the rows' locations, reading the next part while
this one is used (:func:`scan`). What a pass keeps grows with the rows it is asked for (a few int64
each), never with the features of the rest. Two passes serve training (:mod:`lastlayer.training.data`):

* :func:`load`, before any training: the per-feature mean and variance of each training set
  (:class:`Moments`: each part's statistics merged by Chan's formula in float64), the rows training
  will read (its replayed draws, :func:`lastlayer.training.train.draw_counts`, and validation
  batches) gathered into a :class:`RowStore`, and every part a later pass reads checked against its
  name; a part found damaged or gone raises :class:`DamagedCache`, and the run goes back to extraction.
* :func:`predict`, after training: the predictions of classifiers for rows (evaluation of every
  split, cross-validation's held-out folds, the misclassified images), logits accumulated for at most
  :data:`LOGITS_BYTES` of rows at a time (an ensemble's networks add their share in turn).

The gathered rows are at most one per draw (an image drawn k times has at most k variants), so they
are bounded by steps x batch size, not by the number of images; past :data:`GATHER_BYTES` they go to
a temporary file and are read back a row at a time (a few microseconds each from the page cache).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lastlayer.bottlenecks.needs import Bottlenecks
from lastlayer.bottlenecks.parts import FeatureSource, UnreadablePart, unpack
from lastlayer.engines.batch import prefetch
from lastlayer.training.train import Classifier, softmax_cross_entropy

#: Gathered rows kept in memory up to this many bytes; beyond, in a temporary file.
GATHER_BYTES = 64 << 20
#: Logits accumulated at once by :func:`predict`.
LOGITS_BYTES = 64 << 20
#: Part files read ahead of the one in use.
PREFETCH_PARTS = 1
#: Bytes of float64 copies :class:`Moments` makes at once.
MOMENTS_BYTES = 4 << 20

#: ``consume(network, indices into the ids, float32 [k, D_network])``.
Consume = Callable[[int, np.ndarray, np.ndarray], None]


class DamagedCache(Exception):
    """Part files that a pass found gone or damaged.

    Attributes:
        parts: each of them.
    """

    def __init__(self, parts: list[UnreadablePart]) -> None:
        super().__init__(", ".join(str(p) for p in parts))
        self.parts = parts


def scan(bottlenecks: Bottlenecks, ids: np.ndarray, consume: Consume, verify: bool = False) -> None:
    """Hand the features of the rows ``ids`` to ``consume``, network by network and a part file at a
    time: each part read once per network, the next while this one is consumed; with ``verify`` each
    file is checked against its name.

    Raises:
        DamagedCache: parts that are gone or damaged (after every other part was handed over).
    """
    locations = bottlenecks.locations(ids)
    plain = ids < len(bottlenecks.plain)
    failures: list[UnreadablePart] = []
    for network in range(len(bottlenecks.sources)):
        for mask in (plain, ~plain):
            at = np.flatnonzero(mask)
            if not len(at):
                continue
            folder = (bottlenecks.sources if mask is plain else bottlenecks.variant_sources)[network]
            order = at[np.argsort(locations[at, network], kind="stable")]
            parts, rows = unpack(locations[order, network])
            groups = np.split(np.arange(len(order)), np.flatnonzero(np.diff(parts)) + 1)
            with prefetch(_read(folder, parts, groups, verify), PREFETCH_PARTS) as ready:
                for group, x in ready:
                    if isinstance(x, UnreadablePart):
                        failures.append(x)
                    else:
                        consume(network, order[group], x[rows[group]])
    if failures:
        raise DamagedCache(failures)


def _read(
    folder: FeatureSource, parts: np.ndarray, groups: list[np.ndarray], verify: bool
) -> Iterator[tuple[np.ndarray, np.ndarray | UnreadablePart]]:
    """Each group of rows with its part's features (or why they could not be read)."""
    for group in groups:
        try:
            yield group, folder.read(int(parts[group[0]]), verify)
        except UnreadablePart as exc:
            yield group, exc


class Moments:
    """Count, mean and sum of squared deviations per feature of rows in ``cells`` groups, accumulated
    a batch at a time (Welford's algorithm by batches: Chan, Golub and LeVeque's merge, in float64).

    Attributes:
        count: ``float64 [cells, B]`` rows seen per cell, by each network.
        mean, m2: ``float64 [cells, D]``.
        offsets: ``[B + 1]`` each network's first feature.
    """

    def __init__(self, cells: int, dims: Sequence[int]) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(dims)]).astype(np.int64)
        self.count = np.zeros((cells, len(dims)))
        self.mean = np.zeros((cells, self.offsets[-1]))
        self.m2 = np.zeros((cells, self.offsets[-1]))

    def add(self, network: int, cells: np.ndarray, x: np.ndarray) -> None:
        """Add the rows ``x`` ``[k, D_network]`` of network ``network``, each in its cell ``[k]``
        (:data:`MOMENTS_BYTES` of them at a time)."""
        cols = slice(self.offsets[network], self.offsets[network + 1])
        step = max(1, MOMENTS_BYTES // (8 * x.shape[1]))
        for cell in np.unique(cells).tolist():
            mine = np.flatnonzero(cells == cell)
            for start in range(0, len(mine), step):
                rows = x[mine[start : start + step]].astype(np.float64)
                mean = rows.mean(axis=0)
                rows -= mean
                n = self.count[cell, network]
                batch = (len(rows), mean, np.square(rows, out=rows).sum(axis=0))
                merged = _chan((n, self.mean[cell, cols], self.m2[cell, cols]), batch)
                self.count[cell, network], self.mean[cell, cols], self.m2[cell, cols] = merged

    def merged(self, cells: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The mean and (population) standard deviation ``[D]`` of the rows of ``cells`` together."""
        mean, std = np.zeros(self.offsets[-1]), np.zeros(self.offsets[-1])
        for network in range(len(self.offsets) - 1):
            cols = slice(self.offsets[network], self.offsets[network + 1])
            total: tuple[float, np.ndarray, np.ndarray] = (0.0, np.zeros(0), np.zeros(0))
            for cell in cells:
                total = _chan(total, (self.count[cell, network], self.mean[cell, cols], self.m2[cell, cols]))
            n, mean[cols], m2 = total
            std[cols] = np.sqrt(m2 / n) if n else 0.0
        return mean, std


def _chan(
    a: tuple[float, np.ndarray, np.ndarray], b: tuple[float, np.ndarray, np.ndarray]
) -> tuple[float, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations of two groups together."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    if not nb:
        return a
    if not na:
        return b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + np.square(delta) * (na * nb / n)


class RowStore:
    """Rows of features by id: in memory up to :data:`GATHER_BYTES`, beyond that in a temporary file
    read a row at a time.

    Attributes:
        ids: ``int64 [n]`` sorted ids of the rows held.
        dim: feature size D.
    """

    def __init__(self, ids: np.ndarray, dim: int) -> None:
        self.ids, self.dim = ids, dim
        size = len(ids) * dim * 4
        self._array: np.ndarray | None = None
        self._file = None
        if size <= GATHER_BYTES:
            self._array = np.zeros((len(ids), dim), np.float32)
        else:
            self._file = tempfile.TemporaryFile(prefix="lastlayer-rows-")  # noqa: SIM115 (closed by close())
            self._file.truncate(size)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        if not len(self.ids) or (self.ids[rows] != ids).any():
            raise KeyError("a row that was not gathered")  # a bug, not a user's mistake
        return rows

    def put(self, ids: np.ndarray, column: int, x: np.ndarray) -> None:
        """Store ``x`` ``[k, d]`` as columns ``column`` to ``column + d`` of the rows ``ids``."""
        rows = self._rows(ids)
        if self._array is not None:
            self._array[rows, column : column + x.shape[1]] = x
            return
        assert self._file is not None
        x = np.ascontiguousarray(x, np.float32)
        for row, values in zip(rows.tolist(), x, strict=True):
            os.pwrite(self._file.fileno(), values.tobytes(), (row * self.dim + column) * 4)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """``float32 [k, D]``: the rows ``ids``."""
        rows = self._rows(ids)
        if self._array is not None:
            return self._array[rows]
        assert self._file is not None
        width = self.dim * 4
        data = b"".join(os.pread(self._file.fileno(), width, row * width) for row in rows.tolist())
        return np.frombuffer(data, np.float32).reshape(len(rows), self.dim)

    def close(self) -> None:
        """Remove the temporary file, if any."""
        if self._file is not None:
            self._file.close()


def load(
    bottlenecks: Bottlenecks,
    statistics: tuple[np.ndarray, np.ndarray, int],
    gather: np.ndarray,
    check: np.ndarray,
) -> tuple[Moments, RowStore]:
    """The pass before training: one read of every part that holds a row asked for.

    Args:
        statistics: ids of rows, the cell of each, and the number of cells: their :class:`Moments`.
        gather: ids of the rows to gather into a :class:`RowStore`.
        check: ids of rows whose parts are to be checked (those later passes read).

    Raises:
        DamagedCache: parts that are gone or damaged.
    """
    ids, cells, n_cells = statistics
    moments = Moments(n_cells, [s.dim for s in bottlenecks.sources])
    wanted = np.unique(gather)
    store = RowStore(wanted, bottlenecks.dim)
    columns = moments.offsets
    everything = np.concatenate([ids, wanted, check])

    def consume(network: int, at: np.ndarray, x: np.ndarray) -> None:
        stats = at < len(ids)
        moments.add(network, cells[at[stats]], x[stats])
        gathered = ~stats & (at < len(ids) + len(wanted))
        if gathered.any():
            store.put(everything[at[gathered]], int(columns[network]), x[gathered])

    try:
        scan(bottlenecks, everything, consume, verify=True)
    except BaseException:
        store.close()
        raise
    return moments, store


@dataclass(frozen=True)
class Predictions:
    """What classifiers say of some rows.

    Attributes:
        predicted: ``int64 [n]`` the most probable class of each.
        confidence: ``float32 [n]`` its probability.
        true_probability: ``float32 [n]`` the probability of the true class.
    """

    predicted: np.ndarray
    confidence: np.ndarray
    true_probability: np.ndarray

    def __getitem__(self, at: np.ndarray | slice) -> Predictions:
        return Predictions(self.predicted[at], self.confidence[at], self.true_probability[at])


def predict(
    bottlenecks: Bottlenecks,
    ids: np.ndarray,
    classifiers: Sequence[Classifier],
    which: np.ndarray,
    truth: np.ndarray,
) -> Predictions:
    """The predictions for the rows ``ids``, each by ``classifiers[which[i]]``, with ``truth`` their
    true classes; logits for at most :data:`LOGITS_BYTES` of rows at a time, in the order of their
    first network's locations (so that one network's parts are read once in all).

    Raises:
        DamagedCache: parts that are gone or damaged.
    """
    n_classes = len(classifiers[0].biases)
    chunk = max(1, LOGITS_BYTES // (4 * n_classes))
    order = np.argsort(bottlenecks.locations(ids)[:, 0], kind="stable")
    predicted = np.zeros(len(ids), np.int64)
    confidence, true_probability = np.zeros(len(ids), np.float32), np.zeros(len(ids), np.float32)
    for start in range(0, len(ids), chunk):
        sel = order[start : start + chunk]
        logits = class_logits(bottlenecks, ids[sel], classifiers, which[sel])
        probs, _ = softmax_cross_entropy(logits, truth[sel])
        predicted[sel] = logits.argmax(axis=1)
        confidence[sel] = probs[np.arange(len(sel)), predicted[sel]]
        true_probability[sel] = probs[np.arange(len(sel)), truth[sel]]
    return Predictions(predicted, confidence, true_probability)


def class_logits(
    bottlenecks: Bottlenecks, ids: np.ndarray, classifiers: Sequence[Classifier], which: np.ndarray
) -> np.ndarray:
    """``float32 [n, C]``: each row's logits by its classifier, every network adding its share."""
    offsets = np.concatenate([[0], np.cumsum([s.dim for s in bottlenecks.sources])])
    logits = np.zeros((len(ids), len(classifiers[0].biases)), np.float32)

    def consume(network: int, at: np.ndarray, x: np.ndarray) -> None:
        cols = slice(offsets[network], offsets[network + 1])
        for c in np.unique(which[at]).tolist():
            mine = which[at] == c
            logits[at[mine]] += x[mine] @ classifiers[c].weights[cols]

    scan(bottlenecks, ids, consume)
    return logits + np.stack([c.biases for c in classifiers])[which]
