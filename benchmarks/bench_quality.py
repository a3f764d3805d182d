"""Model quality: cross-validated accuracy of each architecture, head option and ensemble, and the
end-to-end extraction rate of each architecture.

    python benchmarks/bench_quality.py accuracy --images DIR [--images DIR ...] [--folds 5] [--repeats 3]
    python benchmarks/bench_quality.py throughput [--images DIR] [--rounds 3]
    python benchmarks/bench_quality.py cold --train_top none head [--images DIR] [--rounds 3]

``accuracy`` extracts (or reuses, from ``--bottleneck-dir``) each network's features once, then refits
the last layer K times per repeat on the cached features (no network pass) and prints, per data set,
one row per configuration: mean and spread over all folds of all repeats of accuracy, balanced
accuracy and macro-F1, and the paired difference in accuracy to the first row (same folds). Heads:

- ``retrain.py``: raw features, class-uniform batches (lastlayer before issue 10);
- ``standardized, balanced``: ``--balance_classes``;
- ``standardized`` (the default now): uniform batches.

``--train_top none head`` adds, per architecture, the rows of ``--train_top=head``: the cached
activations before the head convolution, and in each fold the head trained with a softmax on the
fold's training images (:func:`lastlayer.training.top.train_top`), then the head above fitted on the
trained head's features, as a run does.

``cold`` times whole cold jobs (empty bottleneck cache, networks already built, report on, 500 steps)
of each ``--train_top`` value side by side, interleaved over rounds, and prints the median seconds,
the median over rounds of each one's time relative to the first one's, and the cache's bytes per image.

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
from lastlayer.training.top import HEAD_LR_SCALE, features_of, train_top
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


def trained_top(fit: Fit, balance: bool, steps: int, seed: int, models, lr_scale: float) -> Fit:
    """``--train_top=head``: train the head with a softmax on the fold's training rows (cached
    activations), then ``fit`` on the trained head's features."""
    (model,) = models

    def fit_top(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, n_classes: int) -> np.ndarray:
        config = TrainConfig(steps=steps, seed=seed, balance_classes=balance, log_steps=False)
        scaler = Standardizer.of(x)
        net = train_top(model.head, lambda pos, _rng: x[pos], y, n_classes, config, scaler, lr_scale)
        return fit(features_of(net, x), y, features_of(net, test_x), n_classes)

    return fit_top


def fitter(top: str, standardize: bool, balance: bool, seed: int, models, args: argparse.Namespace) -> Fit:
    """The fit of one row of the table: the head alone, or after training the top."""
    fit = head(standardize, balance, args.steps, seed)
    return fit if top == "none" else trained_top(fit, balance, args.steps, seed, models, args.head_lr_scale)


def features(
    images_dir: Path, architecture: str, bottleneck_dir: str, model_dir: str, blocks: bool, top: str = "none"
) -> tuple[np.ndarray, np.ndarray, int, object]:
    """The cached (else computed) features of every usable image (``float32 [n, D]``, read at once:
    the sets here are small; with ``top="head"`` the activations before the head), their classes, the
    number of classes and the networks."""
    images = scan(str(images_dir), 10, 10)
    models = load_backbones(architecture, model_dir, block_features=blocks, train_top=top)
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
    return bottlenecks.read(positions), truth, len(images.labels), models


def accuracy(args: argparse.Namespace) -> None:
    for images_dir in args.images:
        print(f"\n## {images_dir} ({args.folds}-fold x {args.repeats}, {args.steps} steps)")
        print("| architecture | train_top | head | accuracy | balanced accuracy | macro-F1 | vs first row |")
        print("|---|---|---|---|---|---|---|")
        base: np.ndarray | None = None
        for architecture, top in ((a, t) for a in args.architectures for t in args.train_top):
            x, truth, n_classes, models = features(
                images_dir, architecture, args.bottleneck_dir, args.model_dir, args.block_features, top
            )
            for name in args.heads:
                standardize, balance = HEADS[name]

                started = time.perf_counter()
                confusions = [
                    c
                    for r in range(args.repeats)
                    for c in fold_confusions(
                        x,
                        truth,
                        n_classes,
                        args.folds,
                        r,
                        fitter(top, standardize, balance, r, models, args),
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
                label = f"head (lr x{args.head_lr_scale:g})" if top == "head" else top
                seconds = time.perf_counter() - started
                print(
                    f"| {shown} | {label} | {name} | {' | '.join(cells)} | {paired} | ({seconds:.0f} s)",
                    flush=True,
                )
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


def cold(args: argparse.Namespace) -> None:
    seconds: dict[str, list[float]] = {t: [] for t in args.train_top}
    per_image: dict[str, float] = {}
    architecture = args.architectures[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for top in args.train_top:
                work = Path(tmp) / f"{top}-{r}"
                flags = (f"--architecture={architecture}", f"--train_top={top}")
                wall, summary = timed_retrain(options(args.images[0], work, Path(args.model_dir), *flags))
                seconds[top].append(wall)
                cached = sum(f.stat().st_size for f in (work / "bottlenecks").rglob("part-*.parquet"))
                per_image[top] = cached / max(1, summary["cache"]["computed"])
                print(
                    f"round {r + 1}: --train_top={top} {wall:.1f} s, timings {summary['timings']}", flush=True
                )
    first = np.array(seconds[args.train_top[0]])
    print(
        f"\n| {architecture} --train_top | cold job s: median (range) | "
        f"relative to {args.train_top[0]} | cache per image |"
    )
    print("|---|---|---|---|")
    for top, values in seconds.items():
        spread = f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        ratio = np.median(np.array(values) / first)
        print(f"| {top} | {spread} | {ratio:.2f} | {per_image[top] / 1024:.1f} KiB |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("accuracy", "throughput", "cold"))
    parser.add_argument("--images", type=Path, action="append", help="a folder of class folders (repeat)")
    parser.add_argument("--architectures", nargs="+", default=None)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--train_top", nargs="+", default=["none"], choices=("none", "head"))
    parser.add_argument("--head-lr-scale", type=float, default=HEAD_LR_SCALE, help="--train_top's")
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
    if "head" in args.train_top and args.what != "throughput":
        args.architectures = [a for a in args.architectures if "+" not in a]  # one network's top
    unknown = [a for a in args.architectures for n in a.split("+") if n not in ZOO]
    missing = [d for d in args.images if not d.is_dir()]
    if unknown or missing:
        print(f"unknown architectures {unknown} or missing folders {missing}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    if args.what == "accuracy":
        accuracy(args)
    elif args.what == "cold":
        cold(args)
    else:
        throughput(args)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
