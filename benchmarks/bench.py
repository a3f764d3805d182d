"""lastlayer benchmark: ratios measured side by side in one run on the same images.

    python benchmarks/bench.py [--images DIR] [--model-dir DIR] [--rounds N] [--parts abcd]

Prints the measured figures and four ratios (targets in brackets):

(a) end-to-end extraction images/s (files on disk to cache) over the limit 1 / (1/decode + 1/network),
    both parts measured here at their best settings                                          [>= 0.9]
(b) training with distortions, 500 steps: retrain.py's way (decode, distort and run the network for
    every image of every batch) over lastlayer's cached variants (cold cache, only the variants the
    seeded sampler draws), wall time, on the images and on the images repeated 4 times     [>= 5 both];
    and the cross-validated accuracy with distortions on and off (5 folds, every image a training
    image, so that every fold trains on distorted variants)
(c) a warm re-run (everything cached, 500 steps) over the cold run, wall time                 [<= 0.05]
(d) peak RSS of a run on the images repeated 4 times over one on the images, the feature
    matrices' bytes taken out of both                                                         [<= 1.2]

retrain.py's way in (b) is timed for a few steps and scaled to 500 (it would take many minutes; its
cost per step does not depend on the number of images); the number of steps timed is printed.
Default images: ../shared/datasets/flower_photos_sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import lastlayer
from lastlayer.dataset import TRAINING, scan
from lastlayer.model.contract import FEATURES, IMAGE
from lastlayer.preprocess import Distortions, decode, distort, open_image
from lastlayer.settings.options import parse_flags
from lastlayer.settings.run import TrainingConfig
from lastlayer.training.train import softmax_cross_entropy
from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "flower_photos_sample"
DISTORT = Distortions(flip_left_right=True, random_crop=10, random_scale=10, random_brightness=10)
DISTORT_FLAGS = ("--flip_left_right", "--random_crop=10", "--random_scale=10", "--random_brightness=10")


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def best_decode_rate(datas: list[bytes], prep) -> tuple[float, int]:
    """Images/s of decode + resize alone, best over thread counts."""
    best = (0.0, 1)
    for threads in (1, 2, os.cpu_count() or 2):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda d: decode(d, prep), datas))
        best = max(best, (rate(len(datas), time.perf_counter() - start), threads))
    return best


def best_network_rate(model, inputs: np.ndarray) -> tuple[float, str]:
    """Images/s of the network alone over all ``inputs``, best over batch sizes and over one session
    with a thread per core versus one single-threaded session per core."""
    cores = os.cpu_count() or 2
    best = (0.0, "")
    for batch in (1, 2, 4, 8, 16, 32):
        for layout in ("one session", "session per core"):
            sessions = (
                [model.session(cores)]
                if layout == "one session"
                else [model.session(1) for _ in range(cores)]
            )
            for session in sessions:
                session.run([FEATURES], {IMAGE: inputs[:batch]})
            starts = range(0, len(inputs), batch)

            def work(k: int, sessions=sessions, starts=starts, batch=batch) -> None:
                for i in starts[k :: len(sessions)]:
                    sessions[k].run([FEATURES], {IMAGE: inputs[i : i + batch]})

            start = time.perf_counter()
            with ThreadPoolExecutor(len(sessions)) as pool:
                list(pool.map(work, range(len(sessions))))
            best = max(best, (rate(len(inputs), time.perf_counter() - start), f"batch {batch}, {layout}"))
    return best


def options(images: Path, work: Path, model_dir: Path, *extra: str) -> list[str]:
    """retrain flags for a 500-step run on ``images`` with everything under ``work``."""
    out = work / "out"
    return [
        f"--image_dir={images}",
        f"--model_dir={model_dir}",
        f"--bottleneck_dir={work / 'bottlenecks'}",
        f"--output_graph={out / 'g.onnx'}",
        f"--output_labels={out / 'l.txt'}",
        f"--summaries_dir={out / 's'}",
        "--how_many_training_steps=500",
        "--random_seed=1",
        *extra,
    ]


def timed_retrain(flags: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = lastlayer.retrain(**parse_flags(flags).api_kwargs())
    return time.perf_counter() - start, summary.to_dict()


def retrain_py_way(images: Path, model, steps: int, batch: int = 100) -> float:
    """Seconds for ``steps`` steps done as retrain.py does with distortions on: every image of every
    batch is read, decoded, distorted and run through the network again."""
    image_set = scan(str(images), 10, 10)
    train = [f for f in image_set.files if f.split == TRAINING]
    by_class = [[f for f in train if f.label_index == c] for c in range(len(image_set.labels))]
    session = model.session(0)
    rng = np.random.default_rng(0)
    weights = np.zeros((model.feature_size, len(by_class)), np.float32)
    start = time.perf_counter()
    for _ in range(steps):
        picks = [by_class[c][rng.integers(len(by_class[c]))] for c in rng.integers(0, len(by_class), batch)]
        x = np.stack(
            [
                distort(
                    open_image(Path(f.url).read_bytes(), model.preprocessing),
                    model.preprocessing,
                    DISTORT,
                    rng,
                )
                for f in picks
            ]
        )
        (feats,) = session.run([FEATURES], {IMAGE: x})
        y = np.array([f.label_index for f in picks])
        probs, _ = softmax_cross_entropy(feats @ weights, y)
        probs[np.arange(batch), y] -= 1
        weights -= 0.01 * feats.T @ probs / batch
    return time.perf_counter() - start


def machine() -> str:
    """The line's start every benchmark prints: processor, cores and Python version."""
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )


def missing_images(images: Path) -> bool:
    """Whether ``images`` is not a folder (then said on stderr, with what to pass)."""
    if images.is_dir():
        return False
    print(f"no images at {images}: pass --images DIR (a folder of class folders)", file=sys.stderr)
    return True


def repeated_copy(images: Path, dest: Path, times: int) -> Path:
    """``images`` repeated ``times`` times, each copy with distinct bytes (a trailing byte after the
    JPEG end marker, which decoders ignore), so the content-addressed cache cannot share them."""
    for src in images.rglob("*"):
        if src.is_file():
            for k in range(times):
                target = dest / src.parent.name / f"{src.stem}_copy{k}{src.suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(src.read_bytes() + bytes([k]))
    return dest


# VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's RSS at fork.
PEAK_RSS = """
import json, sys
import lastlayer
from lastlayer.settings.options import parse_flags
summary = lastlayer.retrain(**parse_flags(json.loads(sys.argv[1])).api_kwargs())
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": int(hwm.split()[1]) * 1024, "used": summary.images["used"]}))
"""


def peak_rss(flags: list[str]) -> tuple[int, int]:
    """Peak RSS (bytes) of a cold run in a fresh process, and the number of images it used."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, json.dumps(flags)],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["peak_rss_bytes"], result["used"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lastlayer-bench-models"
    )
    parser.add_argument("--retrain-py-steps", type=int, default=3, help="steps of retrain.py's way to time")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the (a) and (c) measurements")
    parser.add_argument(
        "--parts", default="abcd", help="the ratios to measure: abcd, or ac for (a) and (c), c for (c) alone"
    )
    args = parser.parse_args()
    if missing_images(args.images):
        return 2
    logging.basicConfig(level=logging.WARNING)
    model = load_feature_model(DEFAULT_ARCHITECTURE, str(args.model_dir))
    files = sorted(p for p in args.images.rglob("*") if p.is_file())
    datas = [p.read_bytes() for p in files]
    print(f"{machine()}; images: {len(files)} from {args.images}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = np.stack([decode(d, model.preprocessing) for d in datas]) if "a" in args.parts else None
        rounds = []
        for r in range(args.rounds):  # interleaved, so that the machine's drift hits every part alike
            bounds = ""
            limit = float("nan")
            if "a" in args.parts:
                decode_rate, decode_threads = best_decode_rate(datas, model.preprocessing)
                net_rate, net_setting = best_network_rate(model, inputs)
                limit = 1 / (1 / decode_rate + 1 / net_rate)
                bounds = (
                    f"decode+resize alone {decode_rate:.0f} img/s ({decode_threads} threads); network alone "
                    f"{net_rate:.0f} img/s ({net_setting}); limit {limit:.0f} img/s; "
                )
            cold_s, cold = timed_retrain(options(args.images, work / f"plain{r}", args.model_dir))
            e2e_rate = rate(cold["cache"]["computed"], cold["timings"]["bottlenecks_s"])
            warm_s, warm = timed_retrain(options(args.images, work / f"plain{r}", args.model_dir))
            assert warm["cache"]["computed"] == 0
            rounds.append((e2e_rate / limit, warm_s / cold_s))
            print(
                f"round {r + 1}: {bounds}end-to-end {e2e_rate:.0f} img/s; cold run (500 steps) "
                f"{cold_s:.2f} s, warm re-run {warm_s:.2f} s (ratio {warm_s / cold_s:.3f})",
                flush=True,
            )
        print(f"warm re-run timings: {warm['timings']}")
        extraction_ratio = float(np.median([a for a, _ in rounds]))
        warm_ratio = float(np.median([c for _, c in rounds]))

        ratios = [
            ("a", "end-to-end extraction / limit (median of rounds)", extraction_ratio, ">=", 0.9),
            ("c", "warm re-run / cold run (wall, median of rounds)", warm_ratio, "<=", 0.05),
        ]
        if "b" in args.parts:
            ratios += distortions(args, model, work)
        if "d" in args.parts:
            ratios += memory(args, work)
    print()
    for key, name, value, op, target in sorted(ratios, key=lambda r: r[0]):
        if key in args.parts:
            ok = value >= target if op == ">=" else value <= target
            print(f"({key}) {name}: {value:.3f}  [target {op} {target}] {'ok' if ok else 'MISSED'}")
    return 0


Ratio = tuple[str, str, float, str, float]


def distortions(args: argparse.Namespace, model, work: Path) -> list[Ratio]:
    """(b): retrain.py's way against lastlayer's cached variants on the images x1 and x4; and the
    cross-validated accuracy with distortions on and off."""
    big = repeated_copy(args.images, work / "x4", 4)
    k = args.retrain_py_steps
    theirs_k = retrain_py_way(args.images, model, k)
    theirs_s = theirs_k * 500 / k
    print(f"distortions, 500 steps: retrain.py's way {theirs_k:.2f} s for {k} steps -> {theirs_s:.0f} s")
    distortion_ratios = []
    for name, folder in (("x1", args.images), ("x4", big)):
        ours_s, ours = timed_retrain(
            options(folder, work / f"distorted-{name}", args.model_dir, *DISTORT_FLAGS)
        )
        distortion_ratios.append(theirs_s / ours_s)
        print(
            f"distortions, 500 steps, {ours['images']['used']} images: lastlayer (cold cache, at most "
            f"{ours['options']['distorted_variants']} variants per training image, as drawn) "
            f"{ours_s:.2f} s"
        )
    shutil.rmtree(big)
    for flags in ((), DISTORT_FLAGS):
        everything = ("--testing_percentage=0", "--validation_percentage=0", "--cross_validation=5", *flags)
        _, folded = timed_retrain(options(args.images, work / f"cv{len(flags)}", args.model_dir, *everything))
        cv = folded["metrics"]["cross_validation"]
        print(
            f"5-fold cross-validation, distortions {'on' if flags else 'off'}: accuracy "
            f"{100 * cv['accuracy']['mean']:.1f}% ± {100 * cv['accuracy']['std']:.1f}, balanced "
            f"{100 * cv['balanced_accuracy']['mean']:.1f}% ± {100 * cv['balanced_accuracy']['std']:.1f}"
        )
    return [
        ("b", "retrain.py distortions / cached variants (wall), images x1", distortion_ratios[0], ">=", 5.0),
        ("b", "retrain.py distortions / cached variants (wall), images x4", distortion_ratios[1], ">=", 5.0),
    ]


def memory(args: argparse.Namespace, work: Path) -> list[Ratio]:
    """(d): peak RSS of a run on the images x4 over one on the images, feature matrices excluded."""
    big = repeated_copy(args.images, work / "x4", 4)
    rss1, n1 = peak_rss(options(args.images, work / "rss1", args.model_dir))
    rss4, n4 = peak_rss(options(big, work / "rss4", args.model_dir))
    # the features of a default run (block features on), not only the last block's
    dim = load_feature_model(
        DEFAULT_ARCHITECTURE, str(args.model_dir), block_features=TrainingConfig().block_features
    ).feature_size
    feat1, feat4 = n1 * dim * 4, n4 * dim * 4
    print(
        f"peak RSS: {rss1 / 2**20:.0f} MiB for {n1} images, {rss4 / 2**20:.0f} MiB for {n4} images "
        f"(feature matrices {feat1 / 2**20:.1f} / {feat4 / 2**20:.1f} MiB)"
    )
    shutil.rmtree(big)
    return [("d", "peak RSS x4 / x1, feature matrices excluded", (rss4 - feat4) / (rss1 - feat1), "<=", 1.2)]


if __name__ == "__main__":
    sys.exit(main())
