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
class Trust:
    """The trust stage's findings; an entry is ``None`` when its flag turned it off or it could not
    run (the log says why)."""

    calibration: Calibration | None = None
