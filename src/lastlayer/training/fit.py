"""The fits of a run: the final one, with its TensorBoard curves and intermediate models, and the K refits
of a cross-validation, each scored on the fold it held out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from lastlayer import storage
from lastlayer.dataset import VALIDATION
from lastlayer.errors import DataError
from lastlayer.model.export import build_classifier
from lastlayer.training.data import TrainingData, final_fit, fold_fits
from lastlayer.training.evaluate import CrossValidation, confusion_matrix, largest_share
from lastlayer.training.multilabel import MultiLabel, fit_and_score
from lastlayer.training.tensorboard import SummaryWriter
from lastlayer.training.train import Classifier, Evaluation
from lastlayer.trust.stage import OutOfFold

if TYPE_CHECKING:
    from lastlayer.dataset import ImageSet
    from lastlayer.settings.run import OutputConfig, TrainingConfig
    from lastlayer.zoo import Backbones

log = logging.getLogger("lastlayer.retrain")

#: Called at each evaluation point of training (every ``--eval_step_interval`` steps and the last).
OnEvaluation = Callable[[Evaluation], None]


@contextmanager
def evaluation_summaries(
    outputs: OutputConfig, storage_options: Mapping[str, Any] | None, on_evaluation: OnEvaluation | None
) -> Iterator[tuple[OnEvaluation, list[Evaluation]]]:
    """TensorBoard's ``train/`` and ``validation/`` event files below ``--summaries_dir``: yields the
    callback that writes each evaluation point (``accuracy``, ``cross_entropy``) and hands it on to
    ``on_evaluation``, and the list holding the last point seen."""
    train_writer = SummaryWriter(storage.join(outputs.summaries_dir, "train"), storage_options)
    validation_writer = SummaryWriter(storage.join(outputs.summaries_dir, "validation"), storage_options)
    last: list[Evaluation] = []

    def on_eval(ev: Evaluation) -> None:
        last[:] = [ev]
        if on_evaluation is not None:
            on_evaluation(ev)
        train_writer.scalar("accuracy", ev.train_accuracy, ev.step)
        train_writer.scalar("cross_entropy", ev.cross_entropy, ev.step)
        if ev.validation_accuracy is not None and ev.validation_cross_entropy is not None:
            validation_writer.scalar("accuracy", ev.validation_accuracy, ev.step)
            validation_writer.scalar("cross_entropy", ev.validation_cross_entropy, ev.step)

    with train_writer, validation_writer:
        yield on_eval, last


def fit(
    data: TrainingData,
    model: Backbones,
    labels: tuple[str, ...],
    training: TrainingConfig,
    outputs: OutputConfig,
    storage_options: Mapping[str, Any] | None,
    seed: int,
    on_evaluation: OnEvaluation | None = None,
) -> tuple[Classifier, Evaluation | None]:
    """Train the softmax layer, writing TensorBoard summaries and intermediate models as it goes;
    return it and its last evaluation point."""

    def on_checkpoint(step: int, clf: Classifier) -> None:
        freq = outputs.intermediate_store_frequency
        if freq > 0 and step > 0 and step % freq == 0:
            url = storage.join(outputs.intermediate_output_graphs_dir, f"intermediate_{step}.onnx")
            log.info("Save intermediate result to : %s", url)
            model_bytes = build_classifier(model, clf, labels, outputs.final_tensor_name)
            storage.write_atomic(url, model_bytes, storage_options)

    if not len(data.labels[VALIDATION]):
        log.warning("The validation set is empty: no validation accuracy (raise --validation_percentage)")
    with evaluation_summaries(outputs, storage_options, on_evaluation) as (on_eval, last):
        saving = on_checkpoint if outputs.intermediate_store_frequency > 0 else None
        with np.errstate(over="ignore", invalid="ignore"):  # a divergence is reported just below
            clf = data.train(final_fit(data, training, seed), on_eval, saving)
    if not (np.isfinite(clf.weights).all() and np.isfinite(clf.biases).all()):
        raise DataError(
            f"training diverged (the last layer's weights are not numbers) with --learning_rate="
            f"{training.learning_rate:g}: lower --learning_rate; no model was written"
        )
    return clf, (last[0] if last else None)


def cross_validate(
    data: TrainingData, labels: tuple[str, ...], training: TrainingConfig, seed: int
) -> tuple[CrossValidation, OutOfFold]:
    """Refit the last layer ``--cross_validation`` K times, each on all usable images but one fold
    (stratified, seeded) with the run's settings, and score it on that fold; log the summary and
    return it with the fold classifiers (for calibration). With distortions on, the training images
    are trained and scored on their variants.

    Raises:
        DataError: fewer usable images than folds.
    """
    fits, positions, truth, fold_of = fold_fits(data, training, seed)
    k = len(fits)
    classifiers = [data.train(fit) for fit in fits]
    predicted = data.predict(classifiers, positions, truth, fold_of).predicted
    confusions = [
        confusion_matrix(truth[fold_of == f], predicted[fold_of == f], len(labels)) for f in range(k)
    ]
    result = CrossValidation.of(confusions, largest_share(truth, len(labels)) or 0.0)
    log.info(
        "Cross-validation, %d folds of %d images: accuracy %.1f%% ± %.1f, balanced accuracy %.1f%% ± %.1f, "
        "macro-F1 %.1f%% ± %.1f (always answering the largest class: %.1f%%)",
        k,
        result.images,
        *(
            100 * v
            for s in (result.accuracy, result.balanced_accuracy, result.macro_f1)
            for v in (s.mean, s.std)
        ),
        100 * result.largest_class_share,
    )
    return result, OutOfFold(positions, truth, fold_of, classifiers)


def fit_final(
    data: TrainingData,
    model: Backbones,
    images: ImageSet,
    training: TrainingConfig,
    outputs: OutputConfig,
    storage_options: Mapping[str, Any] | None,
    seed: int,
    on_evaluation: OnEvaluation | None = None,
) -> tuple[Classifier, MultiLabel | None]:
    """The final fit: the softmax layer (:func:`fit`), or with ``--multi_label`` the sigmoids with
    their thresholds and test scores (:func:`~lastlayer.training.multilabel.fit_and_score`)."""
    if training.multi_label:
        ignored = {
            "intermediate_store_frequency": outputs.intermediate_store_frequency > 0,
            "print_misclassified_test_images": outputs.print_misclassified_test_images,
        }
        for flag in (name for name, given in ignored.items() if given):
            log.warning("--%s is ignored with --multi_label (only the final model has thresholds)", flag)
        with evaluation_summaries(outputs, storage_options, on_evaluation) as (on_eval, _):
            multi = fit_and_score(data, images, training, seed, on_eval)
        return multi.classifier, multi
    return fit(data, model, images.labels, training, outputs, storage_options, seed, on_evaluation)[0], None
