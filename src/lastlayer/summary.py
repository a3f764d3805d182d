"""What a run returns: :class:`RunSummary` for a full run, :class:`ShardResult` for a worker that only
computed its shard of the bottlenecks. Both turn into the JSON the run summary file holds."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer import storage
from lastlayer.dataset import TESTING, TRAINING, VALIDATION
from lastlayer.errors import DataError
from lastlayer.training.evaluate import per_class_scores
from lastlayer.trust.memo import Memo
from lastlayer.trust.summary import Trust
from lastlayer.version import __version__

if TYPE_CHECKING:
    from lastlayer.dataset import ImageSet
    from lastlayer.settings.run import OutputConfig
    from lastlayer.training.data import TrainingData
    from lastlayer.training.evaluate import CrossValidation, Scores
    from lastlayer.training.multilabel import MultiLabelScores
    from lastlayer.training.train import Evaluation
    from lastlayer.zoo import Backbones

#: The run's lines keep the logger name they always had (``INFO:lastlayer.retrain:Save report to``).
log = logging.getLogger("lastlayer.retrain")

#: The most misclassified test images a run summary lists.
MAX_MISCLASSIFIED = 100


def finite(x: float) -> float | None:
    """``x`` rounded to 6 places, ``None`` for NaN (JSON has no NaN)."""
    return None if math.isnan(x) else round(float(x), 6)


@dataclass(frozen=True)
class Metrics:
    """Accuracies of the run (shares in [0, 1]; ``None`` where a split is empty).

    Attributes:
        steps: training steps run.
        final_train_accuracy, final_cross_entropy, final_validation_accuracy: at the last
            evaluation step, on that step's batches (cross entropy in nats).
        test_accuracy: on the test images drawn by ``--test_batch_size`` (all by default), N =
            ``test_n``; retrain.py's "Final test accuracy".
        train_accuracy_all, validation_accuracy_all, test_accuracy_all: on each whole split.
        validation_and_test_accuracy: on validation and test together, N = ``validation_and_test_n``.
        test_balanced_accuracy, test_macro_f1: on the whole test split (mean recall and mean F1 over
            its classes).
        largest_class, largest_class_share: the test split's most frequent class and its share: the
            accuracy of always answering it.
        cross_validation: with ``--cross_validation K``: ``folds``, ``images``, ``accuracy``,
            ``balanced_accuracy`` and ``macro_f1`` (each ``{"mean", "std"}`` over the folds) and
            ``largest_class_share``; else ``None``.
    """

    steps: int
    final_train_accuracy: float | None
    final_cross_entropy: float | None
    final_validation_accuracy: float | None
    test_accuracy: float | None
    test_n: int
    train_accuracy_all: float | None
    validation_accuracy_all: float | None
    test_accuracy_all: float | None
    validation_and_test_accuracy: float | None
    validation_and_test_n: int
    test_balanced_accuracy: float | None = None
    test_macro_f1: float | None = None
    largest_class: str | None = None
    largest_class_share: float | None = None
    cross_validation: CrossValidation | None = None


@dataclass(frozen=True)
class ClassScores:
    """One class's scores on the test split (``None`` where undefined)."""

    precision: float | None
    recall: float | None
    support: int


@dataclass(frozen=True)
class Confusion:
    """A confusion matrix on one split: ``matrix[true][predicted]`` image counts."""

    split: str
    rows: str
    columns: str
    matrix: list[list[int]]


@dataclass(frozen=True)
class CacheStats:
    """What the bottleneck cache did: images computed, reused, damaged cache files found."""

    computed: int
    reused: int
    damaged_files: int


@dataclass(frozen=True)
class Outputs:
    """Where the run wrote its results."""

    output_graph: str
    output_labels: str
    summaries_dir: str
    summary_json: str
    report: str = ""  # the HTML report, "" when none was asked for


@dataclass(frozen=True)
class LearningCurve:
    """The scores at each evaluation point of training (``None`` where the validation set is empty).

    Attributes:
        step: training step of each point.
        train_accuracy, train_cross_entropy: on that step's training batch (share, nats).
        validation_accuracy, validation_cross_entropy: on that step's validation batch.
    """

    step: list[int] = field(default_factory=list)
    train_accuracy: list[float | None] = field(default_factory=list)
    train_cross_entropy: list[float | None] = field(default_factory=list)
    validation_accuracy: list[float | None] = field(default_factory=list)
    validation_cross_entropy: list[float | None] = field(default_factory=list)


@dataclass(frozen=True)
class Misclassified:
    """A test image the model got wrong.

    Attributes:
        path: relative to ``image_dir``.
        true_label, predicted_label: class names.
        score: probability the model gave ``predicted_label``.
        true_score: probability it gave ``true_label`` (the lower, the worse the mistake).
    """

    path: str
    true_label: str
    predicted_label: str
    score: float | None
    true_score: float | None


@dataclass(frozen=True)
class RunSummary:
    """Everything a full run found and wrote; :meth:`to_json` is the run summary file.

    Attributes:
        image_counts: ``{label: {split: images}}``.
        images: ``found``, ``used``, ``skipped`` and per-split counts of usable images.
        skipped: ``{"path", "reason"}`` of each image that could not be used.
        timings: seconds per stage (``model_s``, ``scan_s``, ``bottlenecks_s``, ``training_s``, ``trust_s``,
            ``export_s``, ``total_s``).
        options: every setting of the run, by flag name.
        learning_curve: the scores at each evaluation point of training.
        misclassified: the worst test mistakes (lowest ``true_score`` first), at most
            :data:`MAX_MISCLASSIFIED`; the confusion matrix counts them all.
        trust: calibration and the other findings of :mod:`lastlayer.trust`.
        label_source: where the labels came from (``labels``: "class folders" or the labels file) and
            how many images took their split from each source (``splits``).
        multi_label: with ``--multi_label``, the test split's mAP, micro/macro-F1, exact-match ratio and
            per-label scores and thresholds (then ``metrics``' accuracies are exact-match ratios and the
            confusion matrix compares each image's highest-scoring label with its first label).
    """

    lastlayer_version: str
    architecture: str
    architecture_requested: str
    model_key: str
    seed: int
    image_dir: str
    labels: list[str]
    image_counts: dict[str, dict[str, int]]
    images: dict[str, int]
    skipped: list[dict[str, str]]
    metrics: Metrics
    confusion_matrix: Confusion
    per_class: dict[str, ClassScores]
    cache: CacheStats
    timings: dict[str, float]
    outputs: Outputs
    options: dict[str, Any]
    learning_curve: LearningCurve = field(default_factory=LearningCurve)
    misclassified: list[Misclassified] = field(default_factory=list)
    trust: Trust = field(default_factory=Trust)
    label_source: dict[str, Any] = field(default_factory=dict)
    multi_label: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        *,
        requested: str,
        image_dir: str,
        model: Backbones,
        seed: int,
        images: ImageSet,
        data: TrainingData,
        history: list[Evaluation],
        scores: Scores,
        cross_validation: CrossValidation | None,
        steps: int,
        timings: dict[str, float],
        outputs: OutputConfig,
        options: Mapping[str, Any],
        trust: Trust | None = None,
        multi_label: MultiLabelScores | None = None,
    ) -> RunSummary:
        """The run summary: what was found, used, skipped and scored, and where it went.

        Args:
            requested: the ``--architecture`` asked for (``model`` is what it resolved to).
            history: every evaluation point of the final fit, in order (its last is the final scores).
            steps: ``--how_many_training_steps``.
            timings: seconds per stage.
            options: every setting by flag name.
            trust: the trust stage's findings (calibration, "unknown", suspected labels, duplicates).
            multi_label: a ``--multi_label`` run's scores (mAP, F1s, per label, exact match).
        """
        last = history[-1] if history else None
        precision, recall = per_class_scores(scores.confusion)
        bottlenecks = data.bottlenecks
        return cls(
            lastlayer_version=__version__,
            architecture=model.architecture,
            architecture_requested=requested,
            model_key=model.key,
            seed=seed,
            image_dir=image_dir,
            labels=list(images.labels),
            image_counts=images.counts(),
            images={
                "found": len(images.files),
                "used": int(bottlenecks.usable.sum()),
                "skipped": len(bottlenecks.skipped),
                **{split: len(positions) for split, positions in data.index.items()},
            },
            skipped=[{"path": path, "reason": reason} for path, reason in bottlenecks.skipped],
            metrics=Metrics(
                steps=steps,
                final_train_accuracy=last.train_accuracy if last else None,
                final_cross_entropy=last.cross_entropy if last else None,
                final_validation_accuracy=last.validation_accuracy if last else None,
                test_accuracy=scores.test_accuracy,
                test_n=scores.test_n,
                train_accuracy_all=scores.accuracy_all[TRAINING],
                validation_accuracy_all=scores.accuracy_all[VALIDATION],
                test_accuracy_all=scores.accuracy_all[TESTING],
                validation_and_test_accuracy=scores.accuracy_all["held_out"],
                validation_and_test_n=scores.held_out_n,
                test_balanced_accuracy=_rounded(scores.balanced_accuracy),
                test_macro_f1=_rounded(scores.macro_f1),
                largest_class=None if scores.largest_class is None else images.labels[scores.largest_class],
                largest_class_share=_rounded(scores.largest_share),
                cross_validation=cross_validation,
            ),
            confusion_matrix=Confusion(TESTING, "true label", "predicted label", scores.confusion.tolist()),
            per_class={
                label: ClassScores(finite(precision[i]), finite(recall[i]), int(scores.confusion[i].sum()))
                for i, label in enumerate(images.labels)
            },
            cache=CacheStats(bottlenecks.computed, bottlenecks.reused, bottlenecks.damaged_files),
            timings=timings,
            outputs=Outputs(
                outputs.output_graph,
                outputs.output_labels,
                outputs.summaries_dir,
                outputs.summary_url,
                outputs.report_url if outputs.report else "",
            ),
            options=dict(options),
            learning_curve=learning_curve(history),
            misclassified=misclassified(scores, data, images),
            trust=trust or Trust(),
            multi_label=multi_label.to_dict() if multi_label else None,
            label_source=dict(images.origin),
        )

    def write(self, storage_options: Mapping[str, Any] | None, memo: Memo | None = None) -> None:
        """Write the run summary file (atomically), then the HTML report when the run asked for one
        (its charts read from and kept in ``memo``, when given)."""
        storage.write_atomic(self.outputs.summary_json, self.to_json().encode(), storage_options)
        if self.outputs.report:
            write_report(self, storage_options, memo)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data, keys in the summary file's order."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The run summary file's text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


@dataclass(frozen=True)
class ShardResult:
    """What a worker with ``worker_index > 0`` did: its shard of the bottlenecks is cached.

    Attributes:
        cache: ``computed`` and ``reused`` images of its shard.
    """

    worker_index: int
    worker_count: int
    architecture: str
    cache: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(self.to_dict())


def misclassified(scores: Scores, data: TrainingData, images: ImageSet) -> list[Misclassified]:
    """The whole test split's mistakes, worst (lowest probability of the true class) first, at most
    :data:`MAX_MISCLASSIFIED`."""
    truth, test = data.labels[TESTING], scores.test
    wrong = np.flatnonzero(test.predicted != truth)
    worst = wrong[np.argsort(test.true_probability[wrong], kind="stable")][:MAX_MISCLASSIFIED]
    positions, labels = data.index[TESTING], images.labels
    return [
        Misclassified(
            images.files[positions[i]].relpath,
            labels[truth[i]],
            labels[test.predicted[i]],
            finite(test.confidence[i]),
            finite(test.true_probability[i]),
        )
        for i in worst
    ]


def write_report(
    summary: RunSummary, storage_options: Mapping[str, Any] | None, memo: Memo | None = None
) -> None:
    """Write the run's HTML report to ``summary.outputs.report``, or warn when the report's
    libraries are not installed or the report refuses the run (more classes than a report shows,
    a file that is not a report at its path): the model and the summary are written already."""
    from lastlayer.report import page as report

    if (missing := report.missing_libraries()) is not None:
        log.warning("No report written: %s", missing)
        return
    try:
        report.write(summary.to_dict(), summary.outputs.report, storage_options, memo=memo)
    except DataError as exc:
        log.warning("No report written: %s", exc)
        return
    log.info("Save report to : %s", summary.outputs.report)


def learning_curve(history: list[Evaluation]) -> LearningCurve:
    """The evaluation points of training as columns."""

    def column(values: list[float | None]) -> list[float | None]:
        return [_rounded(v) for v in values]

    return LearningCurve(
        [ev.step for ev in history],
        column([ev.train_accuracy for ev in history]),
        column([ev.cross_entropy for ev in history]),
        column([ev.validation_accuracy for ev in history]),
        column([ev.validation_cross_entropy for ev in history]),
    )


def _rounded(x: float | None) -> float | None:
    return None if x is None else finite(x)
