"""int8 backbones against their float networks: speed, features, accuracy and size (issue 13).

    python benchmarks/bench_int8.py [--images DIR] [--architectures a,b] [--rounds 3] [--folds 5]

For each zoo network (default: all of them) and its ``<name>_int8`` version, on the same images
(default ../shared/datasets/flower_photos_sample):

- network alone: images/s of the network as the local engine runs it (one single-threaded session
  per core, ``--batch_size`` 4) on decoded inputs; end-to-end: images/s from files to a cold
  bottleneck cache with the local engine. Both in ``--rounds`` interleaved rounds; the ratio
  int8 / float is the median of the rounds, with its range.
- cosine similarity of each image's int8 features to its float features (target: mean >= 0.99).
- accuracy by ``--folds``-fold cross-validation, repeated ``--repeats`` times with other folds
  (stratified, the same folds for both), of the softmax layer lastlayer trains (retrain.py's 4000
  steps, learning rate 0.01, batches of 100) on the cached features: float, int8, and the
  float-trained layer on int8 features (what ``--quantize_output_graph`` ships). Target: int8 within
  0.5 points of float; the change is the mean over the folds, with its standard error.
- sizes: the network, and the retrained model ``--output_graph`` (5 classes) in float and in int8.

The folds are ``retrain --cross_validation``'s (:func:`lastlayer.training.data.folds`).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench import machine, missing_images

from lastlayer.bottlenecks.needs import compute_bottlenecks
from lastlayer.dataset import scan
from lastlayer.engines.local import LocalEngine
from lastlayer.model.contract import FEATURES, IMAGE
from lastlayer.model.export import build_classifier
from lastlayer.preprocess import decode
from lastlayer.training.data import folds
from lastlayer.training.train import Classifier, TrainConfig, train
from lastlayer.zoo import ZOO, Backbones, load_feature_model
from lastlayer.zoo.catalog import INT8_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "flower_photos_sample"
BATCH = 4


def network_rate(model, inputs: np.ndarray) -> float:
    """Images/s of ``model`` alone: one single-threaded session per core, batches of :data:`BATCH`."""
    cores = os.cpu_count() or 1
    sessions = [model.session(1) for _ in range(cores)]
    for session in sessions:
        session.run([FEATURES], {IMAGE: inputs[:BATCH]})
    starts = range(0, len(inputs), BATCH)

    def work(k: int) -> None:
        for i in starts[k::cores]:
            sessions[k].run([FEATURES], {IMAGE: inputs[i : i + BATCH]})

    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(work, range(cores)))
    return len(inputs) / (time.perf_counter() - start)


def end_to_end(images, model, work: Path) -> tuple[float, np.ndarray]:
    """Images/s from files to a cold cache, and ``float32 [N, D]`` features of every image."""
    start = time.perf_counter()
    found = compute_bottlenecks(images, model, str(work), LocalEngine())
    seconds = time.perf_counter() - start
    assert found.computed == len(images.files) and found.usable.all()
    return found.computed / seconds, found.read(np.arange(len(images.files)))


def fit(x: np.ndarray, y: np.ndarray, classes: int) -> Classifier:
    empty = np.zeros((0, x.shape[1]), np.float32)
    return train(lambda pos, rng: x[pos], y, empty, np.zeros(0, np.int64), x.shape[1], classes, TrainConfig())


def cross_validate(
    float_x: np.ndarray, int8_x: np.ndarray, y: np.ndarray, k: int, repeats: int
) -> dict[str, list[float]]:
    """Per-fold accuracy (%) of: float, int8, and the float-trained layer on int8 features."""
    classes = int(y.max()) + 1
    scores: dict[str, list[float]] = {"float": [], "int8": [], "float layer on int8": []}
    fold_of = [folds(y, k, seed) for seed in range(repeats)]
    for held in (np.flatnonzero(f == i) for f in fold_of for i in range(k)):
        train_at = np.setdiff1d(np.arange(len(y)), held)
        on_float = fit(float_x[train_at], y[train_at], classes)
        on_int8 = fit(int8_x[train_at], y[train_at], classes)
        scores["float"].append(100 * float(np.mean(on_float.predict(float_x[held]) == y[held])))
        scores["int8"].append(100 * float(np.mean(on_int8.predict(int8_x[held]) == y[held])))
        scores["float layer on int8"].append(100 * float(np.mean(on_float.predict(int8_x[held]) == y[held])))
    return scores


def exported_size(model, classes: int = 5) -> int:
    clf = Classifier(np.zeros((model.feature_size, classes), np.float32), np.zeros(classes, np.float32))
    return len(build_classifier(Backbones((model,)), clf, [f"class {i}" for i in range(classes)]))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lastlayer-bench-models"
    )
    floats = [name for name, entry in ZOO.items() if not entry.int8]
    parser.add_argument("--architectures", default=",".join(floats), help="float zoo names, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="cross-validations, each with other folds")
    parser.add_argument("--inputs", type=int, default=256, help="decoded images for the network-alone rate")
    args = parser.parse_args()
    if missing_images(args.images):
        return 2
    logging.basicConfig(level=logging.WARNING)
    names = args.architectures.split(",")
    images = scan(str(args.images), 10, 10)
    labels = np.array([f.label_index for f in images.files])
    print(f"{machine()}; {len(images.files)} images from {args.images}")
    models = {}
    for name in names:
        for variant in (name, name + INT8_SUFFIX):
            start = time.perf_counter()
            models[variant] = load_feature_model(variant, str(args.model_dir))
            print(f"{variant}: loaded (built if not cached) in {time.perf_counter() - start:.1f} s")
    datas = [Path(f.url).read_bytes() for f in images.files[: args.inputs]]
    net: dict[str, list[float]] = {v: [] for v in models}
    e2e: dict[str, list[float]] = {v: [] for v in models}
    features: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # interleaved, so that the machine's drift hits both alike
            for name in names:
                inputs = np.stack([decode(d, models[name].preprocessing) for d in datas])
                for variant in (name, name + INT8_SUFFIX):
                    net[variant].append(network_rate(models[variant], inputs))
                    rate, features[variant] = end_to_end(images, models[variant], Path(tmp, f"{variant}-{r}"))
                    e2e[variant].append(rate)
                    print(
                        f"round {r + 1}: {variant}: network alone {net[variant][-1]:.0f} img/s, "
                        f"end-to-end {rate:.0f} img/s"
                    )
    print()
    for name in names:
        int8 = name + INT8_SUFFIX
        f, q = features[name], features[int8]
        cosine = (f * q).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)
        scores = cross_validate(f, q, labels, args.folds, args.repeats)
        change = np.array(scores["int8"]) - np.array(scores["float"])
        shipped = np.array(scores["float layer on int8"]) - np.array(scores["float"])
        net_ratio = [b / a for a, b in zip(net[name], net[int8], strict=True)]
        e2e_ratio = [b / a for a, b in zip(e2e[name], e2e[int8], strict=True)]
        cos_ok, acc_ok = cosine.mean() >= 0.99, abs(change.mean()) <= 0.5
        error = change.std(ddof=1) / np.sqrt(len(change))
        print(
            f"{int8}: speed-up network alone {spread(net_ratio)}x, end-to-end {spread(e2e_ratio)}x "
            f"(median, range of {args.rounds} rounds)\n"
            f"  feature cosine to float: mean {cosine.mean():.4f}, min {cosine.min():.4f} "
            f"[target mean >= 0.99] {'ok' if cos_ok else 'MISSED'}\n"
            f"  {args.folds}-fold CV x {args.repeats}: accuracy float {np.mean(scores['float']):.2f}%, int8 "
            f"{np.mean(scores['int8']):.2f}%: change {change.mean():+.2f} +- {error:.2f} points (per fold "
            f"{change.min():+.2f}..{change.max():+.2f}) [target within 0.5] {'ok' if acc_ok else 'MISSED'}; "
            f"float layer on int8 features {shipped.mean():+.2f} points\n"
            f"  size: network {len(models[name].onnx_bytes) / 2**20:.1f} -> "
            f"{len(models[int8].onnx_bytes) / 2**20:.1f} MiB; retrained model (--output_graph, 5 classes) "
            f"{exported_size(models[name]) / 2**20:.1f} -> {exported_size(models[int8]) / 2**20:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
