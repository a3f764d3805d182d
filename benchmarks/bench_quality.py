"""Model quality: cross-validated accuracy of each architecture, head option and ensemble, and the
end-to-end extraction rate of each architecture.

    python benchmarks/bench_quality.py accuracy --images DIR [--images DIR ...] [--folds 5] [--repeats 3]
    python benchmarks/bench_quality.py throughput [--images DIR] [--rounds 3]

``accuracy`` extracts (or reuses, from ``--bottleneck-dir``) each network's features once, then refits
the last layer K times per repeat on the cached features (no network pass) and prints, per data set,
one row per configuration: mean and spread over all folds of all repeats of accuracy, balanced
accuracy and macro-F1, and the paired difference in accuracy to the first row (same folds). Heads:

- ``retrain.py``: raw features, class-uniform batches (lastlayer before issue 10);
- ``standardized, balanced``: ``--balance_classes``;
- ``standardized`` (the default now): uniform batches.

``throughput`` times a cold run (empty cache) of each network on the images, interleaved over rounds
so that the machine's drift hits every network alike, and prints images/s end-to-end (files on disk
to the cache, as benchmarks/bench.py's (a) measures it): median and range over the rounds, and the
median over rounds of each network's rate relative to the first one's (robust to a busy machine).

Prepare the data sets with benchmarks/make_datasets.py (Fashion-MNIST, ELPV) under /tmp.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench import DEFAULT_IMAGES, options, rate, timed_retrain

from lastlayer import pipeline
from lastlayer.bottlenecks.extraction import extract
from lastlayer.dataset import TESTING, TRAINING, VALIDATION, scan
from lastlayer.engines.local import LocalEngine
from lastlayer.settings.run import CacheConfig, EngineConfig, OutputConfig, TrainingConfig
from lastlayer.training.data import TrainingData, folds
from lastlayer.training.evaluate import CrossValidation, confusion_matrix, largest_share
from lastlayer.training.train import Standardizer, TrainConfig, train
from lastlayer.zoo import ZOO, load_backbones

SINGLES = ("mobilenet_v2_1.0_224", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ENSEMBLES = (
    "mobilenet_v2_1.0_224+efficientnet_lite0",
    "efficientnet_lite0+efficientnet_lite2",
    "mobilenet_v2_1.0_224+efficientnet_lite0+efficientnet_lite2",
    "mobilenet_v2_1.0_224+efficientnet_lite0+efficientnet_lite1+efficientnet_lite2",
)
#: name -> (standardize, balance_classes)
HEADS = {
    "retrain.py": (False, True),
    "standardized, balanced": (True, True),
    "standardized": (True, False),
}

#: (training features, training classes, test features, classes) -> predicted classes of the test features
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def fold_confusions(
    x: np.ndarray, truth: np.ndarray, n_classes: int, k: int, seed: int, fit: Fit
) -> list[np.ndarray]:
    """One confusion matrix per fold of a stratified K-fold split of every usable image."""
    fold_of = folds(truth, k, seed)
    out = []
    for f in range(k):
        train_at, test_at = fold_of != f, fold_of == f
        predicted = fit(x[train_at], truth[train_at], x[test_at], n_classes)
        out.append(confusion_matrix(truth[test_at], predicted, n_classes))
    return out


def head(standardize: bool, balance: bool, steps: int, seed: int) -> Fit:
    """Train on a fold's training split as ``retrain`` does, with or without standardization."""

    def fit(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, n_classes: int) -> np.ndarray:
        config = TrainConfig(steps=steps, seed=seed, balance_classes=balance, log_steps=False)
        scaler = Standardizer.of(x) if standardize else None
        clf = train(
            lambda pos, _rng: x[pos],
            y,
            lambda pos: x[:0],
            y[:0],
            x.shape[1],
            n_classes,
            config,
            standardizer=scaler,
        )
        return clf.predict(test_x)

    return fit


def features(
    images_dir: Path, architecture: str, bottleneck_dir: str, model_dir: str, blocks: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """The cached (else computed) features of every usable image (``float32 [n, D]``, read at once:
    the sets here are small), their classes, and the number of classes."""
    images = scan(str(images_dir), 10, 10)
    models = load_backbones(architecture, model_dir, block_features=blocks)
    run = pipeline.Run(
        str(images_dir),
        architecture,
        TrainingConfig(),
        CacheConfig(model_dir, bottleneck_dir),
        OutputConfig(),
        EngineConfig(),
        {},
    )
    with LocalEngine() as engine:
        bottlenecks = extract(images, models, engine, run.source(), None)
    data = TrainingData.of(images, bottlenecks)
    positions = np.concatenate([data.index[s] for s in (TRAINING, VALIDATION, TESTING)])
    truth = np.concatenate([data.labels[s] for s in (TRAINING, VALIDATION, TESTING)])
    return bottlenecks.read(positions), truth, len(images.labels)


def accuracy(args: argparse.Namespace) -> None:
    for images_dir in args.images:
        print(f"\n## {images_dir} ({args.folds}-fold x {args.repeats}, {args.steps} steps)")
        print("| architecture | head | accuracy | balanced accuracy | macro-F1 | vs first row |")
        print("|---|---|---|---|---|---|")
        base: np.ndarray | None = None
        for architecture in args.architectures:
            x, truth, n_classes = features(
                images_dir, architecture, args.bottleneck_dir, args.model_dir, args.block_features
            )
            for name in args.heads:
                standardize, balance = HEADS[name]
                confusions = [
                    c
                    for r in range(args.repeats)
                    for c in fold_confusions(
                        x, truth, n_classes, args.folds, r, head(standardize, balance, args.steps, r)
                    )
                ]
                acc = np.array([np.trace(c) / c.sum() for c in confusions])
                base = acc if base is None else base
                d = (acc - base) * 100
                cv = CrossValidation.of(confusions, largest_share(truth, n_classes) or 0.0)
                cells = [
                    f"{100 * s.mean:.1f} ± {100 * s.std:.1f}"
                    for s in (cv.accuracy, cv.balanced_accuracy, cv.macro_f1)
                ]
                paired = f"{d.mean():+.1f} (se {d.std() / np.sqrt(len(d)):.1f})"
                shown = architecture + (" (block features)" if args.block_features else "")
                print(f"| {shown} | {name} | {' | '.join(cells)} | {paired} |", flush=True)
        print(f"largest class share: {100 * cv.largest_class_share:.1f}%")


def throughput(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {a: [] for a in args.architectures}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for architecture in args.architectures:
                work = Path(tmp) / f"{architecture}-{r}"
                _, summary = timed_retrain(
                    options(args.images[0], work, Path(args.model_dir), f"--architecture={architecture}")
                )
                rates[architecture].append(
                    rate(summary["cache"]["computed"], summary["timings"]["bottlenecks_s"])
                )
                print(f"round {r + 1}: {architecture} {rates[architecture][-1]:.0f} img/s", flush=True)
    first = np.array(rates[args.architectures[0]])
    print(
        f"\n| architecture | images/s: median (range) | relative to {args.architectures[0]} |\n|---|---|---|"
    )
    for architecture, values in rates.items():
        spread = f"{np.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
        print(f"| {architecture} | {spread} | {np.median(np.array(values) / first):.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("accuracy", "throughput"))
    parser.add_argument("--images", type=Path, action="append", help="a folder of class folders (repeat)")
    parser.add_argument("--architectures", nargs="+", default=None)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-features", action="store_true", help="as retrain's --block_features")
    parser.add_argument("--bottleneck-dir", default="/tmp/quality-bottlenecks")
    parser.add_argument("--model-dir", default="/tmp/quality-models")
    args = parser.parse_args()
    args.images = args.images or [DEFAULT_IMAGES]
    args.architectures = args.architectures or (
        [*SINGLES, *ENSEMBLES] if args.what == "accuracy" else list(SINGLES)
    )
    unknown = [a for a in args.architectures for n in a.split("+") if n not in ZOO]
    missing = [d for d in args.images if not d.is_dir()]
    if unknown or missing:
        print(f"unknown architectures {unknown} or missing folders {missing}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    if args.what == "accuracy":
        accuracy(args)
    else:
        throughput(args)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
