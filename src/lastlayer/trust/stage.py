"""The trust stage of a run: the usable images' features gathered once from the cache (one bounded
pass), then calibration; the exported classifier comes back with the temperature folded in."""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lastlayer.bottlenecks import passes as stream
from lastlayer.bottlenecks.needs import Bottlenecks
from lastlayer.dataset import SPLITS, TESTING, TRAINING, VALIDATION
from lastlayer.model import contract
from lastlayer.training.train import Classifier
from lastlayer.trust import calibration, duplicates, labels, memo, ood, stored
from lastlayer.trust.summary import (
    MAX_GROUPS,
    MAX_SUSPECTS,
    Calibration,
    DuplicateGroup,
    Duplicates,
    LabelIssues,
    Member,
    Suspect,
    Trust,
    Unknown,
)

if TYPE_CHECKING:
    from lastlayer.dataset import ImageSet
    from lastlayer.settings.run import OutputConfig, TrainingConfig
    from lastlayer.training.data import TrainingData

log = logging.getLogger("lastlayer.retrain")

#: The trust stage holds every usable image's features in memory up to this many bytes; beyond, it
#: is skipped with a log line (the rest of the run streams the cache and has no such limit).
MAX_FEATURE_BYTES = 4 << 30
#: Folds of the label check without ``--cross_validation``.
LABEL_FOLDS = 5
#: The kind of the stage's entries in the memo.
MEMO_KIND = "trust"


@dataclass(frozen=True)
class OutOfFold:
    """The classifiers of ``--cross_validation`` and the images each held out.

    Attributes:
        positions: ``int64 [M]`` images (positions in the image set).
        truth: ``int64 [M]`` their classes.
        fold_of: ``int64 [M]`` the fold that held each out (the index of its classifier).
    """

    positions: np.ndarray
    truth: np.ndarray
    fold_of: np.ndarray
    classifiers: list[Classifier]


@dataclass(frozen=True)
class Settings:
    """Which analyses run (the flags of :class:`lastlayer.settings.run.TrainingConfig`)."""

    calibrate: bool = True
    unknown_recall: float = 95.0
    unknown_label: str = "unknown"
    unknown_output: str = "ood_score"
    label_issues: bool = True
    folds: int = 5
    seed: int = 0
    duplicates: bool = True

    @classmethod
    def of(cls, training: TrainingConfig, outputs: OutputConfig, seed: int) -> Settings:
        """The settings of a run's flags (without ``--cross_validation``, :data:`LABEL_FOLDS` folds);
        all off with ``--multi_label`` (each analysis is single-label), one log line for each."""
        t = training
        if t.multi_label:
            return _multi_label_off(t)
        return cls(
            t.calibrate,
            t.unknown_recall,
            t.unknown_label,
            outputs.unknown_output,
            t.find_label_issues,
            t.cross_validation or LABEL_FOLDS,
            seed,
            t.find_duplicates,
        )

    @property
    def any(self) -> bool:
        """Whether any analysis is on."""
        return self.calibrate or self.unknown_recall > 0 or self.label_issues or self.duplicates


def _multi_label_off(t: TrainingConfig) -> Settings:
    """No analysis: log each one the flags ask for as off."""
    asked = {
        "calibration (--calibrate)": t.calibrate,
        "the unknown score (--unknown_recall)": t.unknown_recall > 0,
        "label issues (--find_label_issues)": t.find_label_issues,
        "duplicates (--find_duplicates)": t.find_duplicates,
    }
    for name in (name for name, on in asked.items() if on):
        log.info("With --multi_label, %s is off: it assumes one label per image", name)
    return Settings(False, 0.0, t.unknown_label, "", False, LABEL_FOLDS, 0, False)


@dataclass(frozen=True)
class Findings:
    """What the stage returns: the classifier to export, the "none of the above" score to export
    with it (``None`` when off), and the summary entry."""

    classifier: Classifier
    unknown: ood.ExportedDistance | None
    summary: Trust


@dataclass(frozen=True)
class Features:
    """Every usable image's features (its first row: plain, or with distortions on a training
    image's first variant).

    Attributes:
        positions: ``int64 [N]`` positions in the image set, sorted.
        x: ``float32 [N, D]``.
        labels: ``int64 [N]``.
        split: ``int64 [N]`` index into :data:`~lastlayer.dataset.SPLITS`.
    """

    positions: np.ndarray
    x: np.ndarray
    labels: np.ndarray
    split: np.ndarray

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """``int64``: the rows of the images at ``positions``."""
        return np.searchsorted(self.positions, positions)

    def of(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The features ``[n, D]`` and labels ``[n]`` of one split."""
        at = self.split == SPLITS.index(split)
        return self.x[at], self.labels[at]


def gather(bottlenecks: Bottlenecks, index: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> Features:
    """The features of the usable images of each split (``index``: split to positions, ``labels``:
    split to classes), read in one pass over the cache.

    Raises:
        DamagedCache: a part file is damaged or gone.
    """
    positions = np.concatenate([index[s] for s in SPLITS])
    order = np.argsort(positions, kind="stable")
    truth = np.concatenate([labels[s] for s in SPLITS])[order]
    split = np.repeat(np.arange(len(SPLITS)), [len(index[s]) for s in SPLITS])[order]
    positions = positions[order]
    x = np.zeros((len(positions), bottlenecks.dim), np.float32)
    columns = np.concatenate([[0], np.cumsum([s.dim for s in bottlenecks.sources])])

    def consume(network: int, at: np.ndarray, rows: np.ndarray) -> None:
        x[at, columns[network] : columns[network + 1]] = rows

    stream.scan(bottlenecks, bottlenecks.first_rows(positions), consume)
    return Features(positions, x, truth, split)


def analyse(
    data: TrainingData,
    classifier: Classifier,
    settings: Settings,
    names: Names,
    out_of_fold: OutOfFold | None = None,
) -> Findings:
    """The trust stage on a run's training data (its usable images of each split, in the cache): the
    classifier to export (calibrated), its "none of the above" score and what was found; read from
    the memo of the run's cache (:meth:`Memo.of <lastlayer.trust.memo.Memo.of>`) when it holds the
    findings of the same inputs (:func:`memo_key`), else kept there.

    Raises:
        DamagedCache: a part file is damaged or gone.
    """
    bottlenecks, index, labels = data.bottlenecks, data.index, data.labels
    if not settings.any:
        return Findings(classifier, None, Trust())
    size = sum(len(p) for p in index.values()) * bottlenecks.dim * 4
    if size > MAX_FEATURE_BYTES:
        log.warning(
            "Trust analyses skipped: the features of the usable images (%.1f GiB) exceed %.0f GiB in memory",
            size / 2**30,
            MAX_FEATURE_BYTES / 2**30,
        )
        return Findings(classifier, None, Trust())
    features = gather(bottlenecks, index, labels)
    results = memo.Memo.of(bottlenecks)
    entry = memo_key(features, classifier, settings, names, out_of_fold)
    if (recalled := _recall(results, entry, classifier)) is not None:
        return recalled
    found = _analyse(features, classifier, settings, names, out_of_fold)
    results.put(MEMO_KIND, entry, stored.encode(found.classifier, found.unknown, found.summary))
    return found


def memo_key(
    features: Features,
    classifier: Classifier,
    settings: Settings,
    names: Names,
    out_of_fold: OutOfFold | None,
) -> str:
    """The memo key of the stage's findings: everything they depend on (the features, classes, splits
    and paths of the usable images, the classifier, the cross-validation's folds and classifiers, the
    settings and seed) and the code of :mod:`lastlayer.trust` and :mod:`lastlayer.training`."""
    folds: list[np.ndarray] = []
    if out_of_fold is not None:
        folds = [out_of_fold.positions, out_of_fold.truth, out_of_fold.fold_of]
        folds += [a for clf in out_of_fold.classifiers for a in (clf.weights, clf.biases)]
    return memo.key(
        memo.code_digest("lastlayer.trust", "lastlayer.training"),  # training: the classifier's code
        dataclasses.asdict(settings),
        list(names.labels),
        names.paths(features.positions),
        features.positions,
        features.x,
        features.labels,
        features.split,
        classifier.weights,
        classifier.biases,
        out_of_fold is not None,
        *folds,
    )


def _recall(kept: memo.Memo, entry: str, trained: Classifier) -> Findings | None:
    """The findings kept under ``entry`` (their classifier shaped as ``trained``), or ``None`` when
    there are none or they are damaged (the zip's checksums, the shapes)."""
    data = kept.get(MEMO_KIND, entry)
    if data is None:
        return None
    try:
        found = Findings(*stored.decode(data))
        if found.classifier.weights.shape != trained.weights.shape:
            raise ValueError(f"a classifier of shape {found.classifier.weights.shape}")
    except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        log.warning(
            "The trust findings kept at %s are damaged (%s): computing them again",
            kept.url(MEMO_KIND, entry),
            exc,
        )
        return None
    t = found.summary
    log.info(
        "Trust findings reused from %s (same features, classifier, folds and flags): temperature %s, "
        "unknown above %s, %s suspected wrong labels, %s groups of near-duplicates",
        kept.root,
        "—" if t.calibration is None else f"{t.calibration.temperature:.3f}",
        "—" if t.unknown is None else f"{t.unknown.threshold:.4g}",
        "—" if t.label_issues is None else t.label_issues.suspected,
        "—" if t.duplicates is None else t.duplicates.groups,
    )
    return found


def _analyse(
    features: Features,
    classifier: Classifier,
    settings: Settings,
    names: Names,
    out_of_fold: OutOfFold | None,
) -> Findings:
    """Every analysis that ``settings`` turns on."""
    fitted = None
    if settings.calibrate:
        classifier, fitted = calibrate(features, classifier, out_of_fold)
    unknown, found = None, None
    if settings.unknown_recall > 0:
        unknown, found = none_of_the_above(features, classifier, settings)
    issues = label_issues(features, settings, names) if settings.label_issues else None
    copies = near_duplicates(features, names) if settings.duplicates else None
    return Findings(classifier, unknown, Trust(fitted, found, issues, copies))


def near_duplicates(features: Features, names: Names) -> Duplicates:
    """The groups of near-duplicate images, with their classes and splits; leaks (training and
    held out) and conflicts (two classes) listed first."""
    linked = duplicates.pairs(duplicates.unit_rows(features.x))
    found = []
    for group in duplicates.groups(linked):
        split = features.split[group]
        held = split != SPLITS.index(TRAINING)
        leak, conflict = bool(held.any() and (~held).any()), len(np.unique(features.labels[group])) > 1
        found.append((group, leak, conflict))
    found.sort(key=lambda g: (not (g[1] or g[2]), -len(g[0])))
    listed = []
    for group, leak, conflict in found[:MAX_GROUPS]:
        paths = names.paths(features.positions[group])
        members = [
            Member(p, names.labels[features.labels[i]], SPLITS[features.split[i]])
            for p, i in zip(paths, group, strict=True)
        ]
        listed.append(DuplicateGroup(members, leak, conflict))
    leaks, conflicts = sum(g[1] for g in found), sum(g[2] for g in found)
    log.info(
        "Near-duplicates: %d groups (%d pairs) among %d images: %d leaks (training and held out), "
        "%d in two classes",
        len(found),
        len(linked),
        len(features.labels),
        leaks,
        conflicts,
    )
    return Duplicates(
        duplicates.THRESHOLD, len(features.labels), len(linked), len(found), leaks, conflicts, listed
    )


@dataclass(frozen=True)
class Names:
    """How the summary names images and classes.

    Attributes:
        paths: the relative paths of the images at some positions.
        labels: the class names.
    """

    paths: Callable[[np.ndarray], list[str]]
    labels: tuple[str, ...]

    @classmethod
    def of(cls, images: ImageSet) -> Names:
        """The names of an image set: paths relative to its folder, its labels."""
        return cls(lambda at: [f.relpath for f in images.files.at(at)], images.labels)


def label_issues(features: Features, settings: Settings, names: Names) -> LabelIssues | None:
    """The images whose given label out-of-fold probabilities most confidently dispute; ``None``
    when a class has fewer images than folds."""
    counts = np.bincount(features.labels, minlength=len(names.labels))
    if counts.min() < settings.folds:
        log.warning("No label check: a class has fewer than %d usable images", settings.folds)
        return None
    probs = labels.out_of_fold(features.x, features.labels, len(names.labels), settings.folds, settings.seed)
    suspected = labels.suspects(probs, features.labels)
    shown = suspected[:MAX_SUSPECTS]
    given, suggested = features.labels[shown], probs[shown].argmax(axis=1)
    listed = [
        Suspect(
            path,
            names.labels[g],
            names.labels[s],
            round(float(probs[i, g]), 6),
            round(float(probs[i, s]), 6),
            SPLITS[features.split[i]],
        )
        for path, i, g, s in zip(names.paths(features.positions[shown]), shown, given, suggested, strict=True)
    ]
    log.info(
        "Suspected wrong labels: %d of %d images (out-of-fold probabilities, %d folds)",
        len(suspected),
        len(features.labels),
        settings.folds,
    )
    return LabelIssues(settings.folds, len(features.labels), len(suspected), listed)


def none_of_the_above(
    features: Features, classifier: Classifier, settings: Settings
) -> tuple[ood.ExportedDistance | None, Unknown | None]:
    """The distance to the training split's classes, its threshold at ``--unknown_recall`` of the
    validation images, and what it costs on the test split; ``None`` without validation images."""
    val_x, _ = features.of(VALIDATION)
    if not len(val_x):
        log.warning("No unknown threshold: no validation images (raise --validation_percentage)")
        return None, None
    train_x, train_y = features.of(TRAINING)
    distance = ood.fit(train_x, train_y, len(classifier.biases))
    recall = settings.unknown_recall / 100
    threshold = ood.threshold(distance(val_x), recall)
    test_x, test_y = features.of(TESTING)
    unknown = distance(test_x) > threshold
    right = classifier.predict(test_x) == test_y
    meta = contract.Unknown(settings.unknown_output, threshold, settings.unknown_label)
    found = Unknown(
        meta.output,
        meta.label,
        round(threshold, 6),
        recall,
        len(val_x),
        distance.directions.shape[1],
        _mean(unknown),
        _mean(right[~unknown]),
        _mean(right & ~unknown),
    )
    log.info(
        "Unknown above a distance of %.4g (%.0f%% of %d validation images under it): %s of the test images",
        threshold,
        100 * recall,
        len(val_x),
        "—" if found.test_unknown_share is None else f"{100 * found.test_unknown_share:.1f}%",
    )
    return ood.ExportedDistance(distance, meta), found


def _mean(x: np.ndarray) -> float | None:
    return round(float(x.mean()), 6) if len(x) else None


def _oof_logits(features: Features, out_of_fold: OutOfFold) -> np.ndarray:
    """``float32 [M, C]``: each held-out image's logits by the fold classifier that held it out."""
    x = features.x[features.rows(out_of_fold.positions)]
    logits = np.zeros((len(x), len(out_of_fold.classifiers[0].biases)), np.float32)
    for f, clf in enumerate(out_of_fold.classifiers):
        mine = out_of_fold.fold_of == f
        logits[mine] = clf.logits(x[mine])
    return logits


def calibrate(
    features: Features, classifier: Classifier, out_of_fold: OutOfFold | None
) -> tuple[Classifier, Calibration | None]:
    """Fit the temperature on the out-of-fold logits of ``--cross_validation`` (when it ran), else on
    the validation split, and fold it into ``classifier``; ``None`` (and ``classifier`` unchanged)
    without held-out images."""
    oof = None
    if out_of_fold is not None and len(out_of_fold.truth):
        oof = (_oof_logits(features, out_of_fold), out_of_fold.truth)
        held, held_y, where = *oof, "out_of_fold"
    else:
        val_x, held_y = features.of(VALIDATION)
        held, where = classifier.logits(val_x), "validation"
    if not len(held_y):
        log.warning("No temperature fitted: no validation images (raise --validation_percentage)")
        return classifier, None
    t = calibration.fit_temperature(held, held_y)
    test_x, test_y = features.of(TESTING)
    test = classifier.logits(test_x)

    def ece(logits: np.ndarray, y: np.ndarray, temperature: float) -> float | None:
        return calibration.ece(calibration.softmax(logits / temperature), y)

    fitted = Calibration(
        round(t, 6),
        where,
        len(held_y),
        ece(test, test_y, 1.0),
        ece(test, test_y, t),
        None if oof is None else ece(*oof, 1.0),
        None if oof is None else ece(*oof, t),
        calibration.reliability(calibration.softmax(test), test_y),
        calibration.reliability(calibration.softmax(test / t), test_y),
    )
    log.info(
        "Temperature %.3f (fitted on %d %s predictions): test ECE %s -> %s",
        t,
        len(held_y),
        where.replace("_", "-"),
        fitted.test_ece_before,
        fitted.test_ece_after,
    )
    weights, biases = (classifier.weights / t).astype(np.float32), (classifier.biases / t).astype(np.float32)
    return Classifier(weights, biases), fitted
