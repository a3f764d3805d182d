"""What the trust stage found, as the run summary's ``trust`` entry (JSON-ready dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from lastlayer.trust.calibration import Reliability


@dataclass(frozen=True)
class Calibration:
    """The temperature of the exported model and the expected calibration error (15 bins; shares in
    [0, 1]) before and after it.

    Attributes:
        temperature: the logits are divided by it (folded into the exported weights).
        fitted_on: ``"validation"``, or ``"out_of_fold"`` (``--cross_validation``'s held-out folds).
        fitted_n: held-out predictions it was fitted on.
        test_ece_before, test_ece_after: on the test split (``None`` when it is empty).
        out_of_fold_ece_before, out_of_fold_ece_after: on the cross-validation's held-out folds
            (``None`` without ``--cross_validation``; the set the temperature was fitted on).
        test_reliability_before, test_reliability_after: the test split's reliability diagram.
    """

    temperature: float
    fitted_on: str
    fitted_n: int
    test_ece_before: float | None
    test_ece_after: float | None
    out_of_fold_ece_before: float | None
    out_of_fold_ece_after: float | None
    test_reliability_before: Reliability
    test_reliability_after: Reliability


@dataclass(frozen=True)
class Unknown:
    """The exported model's "none of the above" score (:mod:`lastlayer.trust.ood`).

    Attributes:
        output: the model's output of the score (``float32 [N]``).
        label: what ``lastlayer label`` and ``serve`` say above the threshold.
        threshold: the score above which an image is none of the classes.
        recall: share of the held-out images of the classes under the threshold, as asked.
        held_out_n: the validation images it was taken on.
        directions: principal directions of the distance.
        test_unknown_share: share of the test images called unknown (what the threshold costs).
        test_accuracy_answered: accuracy on the test images it answers (``None`` when none).
        test_accuracy_unknown_wrong: test accuracy counting an unknown as a mistake.
    """

    output: str
    label: str
    threshold: float
    recall: float
    held_out_n: int
    directions: int
    test_unknown_share: float | None
    test_accuracy_answered: float | None
    test_accuracy_unknown_wrong: float | None


@dataclass(frozen=True)
class Suspect:
    """An image whose given label the out-of-fold model disputes.

    Attributes:
        path: relative to ``image_dir``.
        given_label, suggested_label: its folder's class, and the most probable one out of fold.
        given_score, suggested_score: their out-of-fold probabilities.
        split: the split it is in.
    """

    path: str
    given_label: str
    suggested_label: str
    given_score: float
    suggested_score: float
    split: str


@dataclass(frozen=True)
class LabelIssues:
    """Suspected wrong labels (:mod:`lastlayer.trust.labels`).

    Attributes:
        folds: K of the out-of-fold fits.
        images: images scored.
        suspected: how many labels confident learning estimates to be wrong.
        listed: the suspects, the lowest ``given_score`` first (at most :data:`MAX_SUSPECTS`).
    """

    folds: int
    images: int
    suspected: int
    listed: list[Suspect]


#: The most suspects a run summary lists.
MAX_SUSPECTS = 100


@dataclass(frozen=True)
class Member:
    """One image of a group of near-duplicates: its path (relative to ``image_dir``), class and split."""

    path: str
    label: str
    split: str


@dataclass(frozen=True)
class DuplicateGroup:
    """Images whose features are near-duplicates (joined by pairs at or above the threshold).

    Attributes:
        leak: some are in the training split and some in a held-out split (their scores are inflated).
        conflict: they are under more than one class.
    """

    members: list[Member]
    leak: bool
    conflict: bool


@dataclass(frozen=True)
class Duplicates:
    """Near-duplicate images (:mod:`lastlayer.trust.duplicates`).

    Attributes:
        threshold: cosine of the features at or above which two images are near-duplicates.
        images: images searched.
        pairs: pairs found; groups: the groups they form; leaks, conflicts: groups of each kind.
        listed: the groups, leaks and conflicts first (at most :data:`MAX_GROUPS`).
    """

    threshold: float
    images: int
    pairs: int
    groups: int
    leaks: int
    conflicts: int
    listed: list[DuplicateGroup]


#: The most groups of near-duplicates a run summary lists.
MAX_GROUPS = 100


@dataclass(frozen=True)
class Trust:
    """The trust stage's findings; an entry is ``None`` when its flag turned it off or it could not
    run (the log says why)."""

    calibration: Calibration | None = None
    unknown: Unknown | None = None
    label_issues: LabelIssues | None = None
    duplicates: Duplicates | None = None
