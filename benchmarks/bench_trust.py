"""The trust stage's targets (issue 20), on the flower sample's cached features.

    python benchmarks/bench_trust.py ood [--images DIR] [--bottleneck-dir D] [--fashion 500]
    python benchmarks/bench_trust.py labels [--images DIR] [--bottleneck-dir D] [--seeds 3]
    python benchmarks/bench_trust.py calibration [--images DIR] [--bottleneck-dir D]
    python benchmarks/bench_trust.py cost [--images DIR] [--bottleneck-dir D] [--rounds 3]
    python benchmarks/bench_trust.py duplicates [--images DIR] [--bottleneck-dir D] [--copies 60]
                                                [--scale 200000]

``ood``: AUROC of telling held-out flowers (validation + test) from Fashion-MNIST test images
(Debian's ``dataset-fashion-mnist``) and from photos that are not flowers (scikit-image's bundled
photos and matplotlib's, each whole and as its four corner quarters), for each candidate score on
the features (max-softmax probability, 5-nearest-neighbour cosine distance, the Mahalanobis
distance of :mod:`lastlayer.trust.ood` with several numbers of directions); then end to end: a
``retrain`` run's exported model on the same images (its ``ood_score`` output and threshold), the
share of test flowers it calls unknown and the test accuracy that costs.

``labels``: copies of the flower sample with 5% of the images moved to another class folder at
random (one copy per seed), each retrained with the defaults; precision and recall of the moved
images among the suspected wrong labels the run lists (the sample's own mistakes count against
precision).

``calibration``: the temperature and the expected calibration error (15 bins) before and after it,
on the test split and out of fold, of a run with the defaults (fitted on the validation split) and
of one with ``--cross_validation 5`` (fitted out of fold).

``cost``: warm re-runs (every feature cached) with the trust stage on and off, interleaved over
``--rounds``: the stage's own seconds (``trust_s``) and the whole run's.

``duplicates``: planted copies of ``--copies`` flower photos, mild (resized to 3/4, JPEG quality 75,
mirrored) and harsh (resized to 1/2, JPEG quality 30): their cosine to their originals against the
closest pairs of distinct photos of the sample, and the recall and precision of
:func:`lastlayer.trust.duplicates.pairs` at its threshold; then ``--scale`` synthetic rows drawn from
a Gaussian with the flower features' mean and covariance, with 1,000 planted near-copies (cosine
about 0.97): the search's seconds, the process's peak RSS, recall and precision.

The flower features come from the bottleneck cache (``--bottleneck-dir``; the first run fills it),
the others from one pass of the network.
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench import DEFAULT_IMAGES
from make_datasets import _demo_data_module
from PIL import Image

from lastlayer import pipeline
from lastlayer.dataset import SPLITS, TESTING, TRAINING
from lastlayer.engines import make_engine
from lastlayer.model.contract import FEATURES
from lastlayer.model.inference import RetrainedModel
from lastlayer.model.runtime import session
from lastlayer.preprocess import decode
from lastlayer.settings.run import CacheConfig, EngineConfig, OutputConfig, TrainingConfig
from lastlayer.training.train import Standardizer, TrainConfig, train
from lastlayer.trust import calibration, duplicates, ood, stage
from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

FASHION = Path("/usr/share/datasets/fashion-mnist")
#: scikit-image's bundled photos (no download), and matplotlib's.
PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "cell", "microaneurysms",
)  # fmt: skip


def flower_features(images: str, bottleneck_dir: str, model_dir: str) -> stage.Features:
    """The flower sample's features from the cache (computed there on the first run)."""
    training = TrainingConfig(random_seed=1)
    run = pipeline.Run(
        images, DEFAULT_ARCHITECTURE, training, CacheConfig(model_dir, bottleneck_dir), OutputConfig(),
        EngineConfig(), {},
    )  # fmt: skip
    model = pipeline.load_model(run.architecture, model_dir, {}, training)
    found = pipeline.scan_images(images, training, {})
    with make_engine(run.engine, {}, None) as engine:
        bottlenecks = pipeline.extract(found, model, run, engine, None)
    data = pipeline.TrainingData.of(found, bottlenecks)
    return stage.gather(bottlenecks, data.index, data.labels)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def fashion_images(n: int) -> list[bytes]:
    demo = _demo_data_module()
    return [png(a) for a in demo.read_idx(demo.find_idx(FASHION, "t10k-images-idx3-ubyte"))[:n]]


def photo_images() -> list[bytes]:
    """Each photo whole and its four corner quarters."""
    import matplotlib.cbook
    import skimage.data

    arrays = [getattr(skimage.data, name)() for name in PHOTOS]
    arrays.append(np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))))
    out = []
    for a in arrays:
        h, w = a.shape[0] // 2, a.shape[1] // 2
        for crop in (a, a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:]):
            out.append(png(np.ascontiguousarray(crop)))
    return out


def network_features(files: list[bytes], model_dir: str) -> np.ndarray:
    """``float32 [n, D]`` features of image files by the default network (one pass)."""
    model = load_feature_model(DEFAULT_ARCHITECTURE, model_dir, None, True)
    runner = session(model.onnx_bytes, model.architecture)
    batches = []
    for start in range(0, len(files), 32):
        x = np.stack([decode(f, model.preprocessing) for f in files[start : start + 32]])
        batches.append(runner.run([FEATURES], {"image": x})[0])
    return np.concatenate(batches)


def knn_cosine(train_x: np.ndarray, x: np.ndarray, k: int = 5) -> np.ndarray:
    """Mean cosine distance to the ``k`` nearest training features."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = np.sort(b @ a.T, axis=1)[:, -k:]
    return 1 - similarity.mean(axis=1)


def max_softmax(train_x: np.ndarray, train_y: np.ndarray, n_classes: int):
    """``1 - max probability`` of a standardized softmax trained as retrain does (4,000 steps)."""
    clf = train(
        lambda pos, rng: train_x[pos], train_y, lambda pos: train_x[pos], train_y[:0],
        train_x.shape[1], n_classes, TrainConfig(log_steps=False), standardizer=Standardizer.of(train_x),
    )  # fmt: skip
    return lambda x: 1 - calibration.softmax(clf.logits(x)).max(axis=1)


def candidates(flowers: stage.Features, outside: dict[str, np.ndarray]) -> None:
    train_x, train_y = flowers.of(TRAINING)
    held = flowers.x[flowers.split != SPLITS.index(TRAINING)]
    n_classes = int(flowers.labels.max()) + 1
    scores = {
        "max-softmax probability (1 - p)": max_softmax(train_x, train_y, n_classes),
        "5-NN cosine distance": lambda x: knn_cosine(train_x, x),
    }
    for r in (32, 64, 128, 256, 1024):
        scores[f"Mahalanobis, {r} directions"] = ood.fit(train_x, train_y, n_classes, r)
    print(f"candidate scores: {len(held)} held-out flowers against " + ", ".join(
        f"{len(v)} {k}" for k, v in outside.items()))  # fmt: skip
    print(f"{'score':40s} " + " ".join(f"{k:>22s}" for k in outside))
    for name, score in scores.items():
        inside = score(held)
        print(f"{name:40s} " + " ".join(f"{ood.auroc(inside, score(x)):22.4f}" for x in outside.values()))


def end_to_end(images: str, bottleneck_dir: str, model_dir: str, outside: dict[str, list[bytes]]) -> None:
    """A retrain run's model on the test flowers and the outside images."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = pipeline.retrain(
            images,
            training=TrainingConfig(random_seed=1),
            cache=CacheConfig(model_dir, bottleneck_dir),
            outputs=OutputConfig(f"{tmp}/m.onnx", f"{tmp}/l.txt", f"{tmp}/s", report=False),
        )
        model = RetrainedModel.load(f"{tmp}/m.onnx")
        found = summary.trust.unknown
        assert found is not None
        test = [p for p in pipeline.scan_images(images, TrainingConfig(), {}).files if p.split == TESTING]
        truth = np.array([f.label_index for f in test])
        probs, inside = model.outputs([model.prepare(Path(f.url).read_bytes()) for f in test])
        assert inside is not None
        setup = f"{DEFAULT_ARCHITECTURE}, retrain's defaults, seed 1"
        print(f"\nend to end ({setup}): threshold {found.threshold:.4g}")
        print(f"  ({found.recall:.0%} of the {found.held_out_n} validation flowers under it)")
        for name, files in outside.items():
            _, scored = model.outputs([model.prepare(f) for f in files])
            assert scored is not None
            flagged = np.mean(scored > found.threshold)
            print(f"  {name:22s} AUROC {ood.auroc(inside, scored):.4f}, called unknown {flagged:.1%}")
        right = probs.argmax(axis=1) == truth
        unknown = inside > found.threshold
        print(
            f"  test flowers ({len(truth)}): called unknown {unknown.mean():.1%}; accuracy "
            f"{right.mean():.1%} without the threshold, {np.mean(right & ~unknown):.1%} counting unknown "
            f"as wrong, {right[~unknown].mean():.1%} on those it answers"
        )


def moved_copy(images: Path, out: Path, share: float, seed: int) -> set[str]:
    """Copy ``images`` to ``out`` with ``share`` of the files in another class folder, drawn with
    ``seed``; the relative paths of the moved files."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    files = sorted(p.relative_to(images) for p in images.rglob("*") if p.is_file())
    moved = set(rng.choice(len(files), round(share * len(files)), replace=False).tolist())
    paths = set()
    for i, rel in enumerate(files):
        folder = rel.parts[0]
        if i in moved:
            others = [c for c in classes if c != folder]
            folder = others[int(rng.integers(len(others)))]
            paths.add(f"{folder}/{rel.name}")
        (out / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / rel, out / folder / rel.name)
    return paths


def label_check(images: str, bottleneck_dir: str, model_dir: str, seeds: int) -> None:
    print("seed  moved  listed  found  precision  recall  trust_s")
    rows = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            moved = moved_copy(Path(images), Path(tmp) / "images", 0.05, seed)
            summary = pipeline.retrain(
                f"{tmp}/images",
                training=TrainingConfig(random_seed=1),
                cache=CacheConfig(model_dir, bottleneck_dir),
                outputs=OutputConfig(f"{tmp}/m.onnx", f"{tmp}/l.txt", f"{tmp}/s", report=False),
            )
        issues = summary.trust.label_issues
        assert issues is not None and len(issues.listed) == issues.suspected
        found = sum(s.path in moved for s in issues.listed)
        precision, recall = found / max(issues.suspected, 1), found / len(moved)
        rows.append((precision, recall))
        print(
            f"{seed:4d}  {len(moved):5d}  {issues.suspected:6d}  {found:5d}  {precision:9.3f}  {recall:6.3f}"
            f"  {summary.timings['trust_s']:7.2f}"
        )
    mean = np.mean(rows, axis=0)
    print(f"mean precision {mean[0]:.3f} (target >= 0.8), recall {mean[1]:.3f} (target >= 0.7)")


def warm_run(images: str, bottleneck_dir: str, model_dir: str, tmp: str, **training: object):
    return pipeline.retrain(
        images,
        training=TrainingConfig(random_seed=1, **training),  # type: ignore[arg-type]
        cache=CacheConfig(model_dir, bottleneck_dir),
        outputs=OutputConfig(f"{tmp}/m.onnx", f"{tmp}/l.txt", f"{tmp}/s", report=False),
    )


def calibration_check(images: str, bottleneck_dir: str, model_dir: str) -> None:
    print("fitted on        T       test ECE before -> after   out-of-fold ECE before -> after")
    with tempfile.TemporaryDirectory() as tmp:
        for folds in (0, 5):
            c = warm_run(images, bottleneck_dir, model_dir, tmp, cross_validation=folds).trust.calibration
            assert c is not None
            oof = (
                "—"
                if c.out_of_fold_ece_before is None
                else f"{c.out_of_fold_ece_before:.4f} -> {c.out_of_fold_ece_after:.4f}"
            )
            print(
                f"{c.fitted_n:4d} {c.fitted_on:11s} {c.temperature:6.3f}   "
                f"{c.test_ece_before:.4f} -> {c.test_ece_after:.4f}          {oof}"
            )


def cost_check(images: str, bottleneck_dir: str, model_dir: str, rounds: int) -> None:
    off = {"calibrate": False, "unknown_recall": 0, "find_label_issues": False, "find_duplicates": False}
    times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm_run(images, bottleneck_dir, model_dir, tmp)  # warms the cache and the page cache
        for _ in range(rounds):
            for name, settings in (("on", {}), ("off", off)):
                t = warm_run(images, bottleneck_dir, model_dir, tmp, **settings).timings
                times[name].append((t.get("trust_s", 0.0), t["total_s"]))
    for name, rows in times.items():
        trust_s, total_s = np.median(np.array(rows), axis=0)
        print(f"trust stage {name:3s}: trust_s median {trust_s:.3f} s, whole warm run median {total_s:.2f} s")
    print(f"(rounds: {times})")


#: The planted copies: name, scale of the sides, file format, JPEG quality.
COPIES = {
    "mild": (
        ("resized to 3/4", 0.75, "PNG", 0),
        ("JPEG quality 75", 1.0, "JPEG", 75),
        ("mirrored", -1.0, "PNG", 0),
    ),
    "harsh": (("resized to 1/2", 0.5, "PNG", 0), ("JPEG quality 30", 1.0, "JPEG", 30)),
}


def copies_of(data: bytes, kinds: tuple[tuple[str, float, str, int], ...]) -> list[bytes]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = []
    for _, scale, fmt, quality in kinds:
        changed = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if scale < 0 else img
        if 0 < scale < 1:
            changed = img.resize((round(img.width * scale), round(img.height * scale)))
        buf = io.BytesIO()
        changed.save(buf, fmt, **({"quality": quality} if quality else {}))
        out.append(buf.getvalue())
    return out


def planted(images: str, bottleneck_dir: str, model_dir: str, n: int) -> np.ndarray:
    """Recall and precision on planted copies; returns the flower features (for :func:`at_scale`)."""
    flowers = flower_features(images, bottleneck_dir, model_dir)
    files = list(pipeline.scan_images(images, TrainingConfig(), {}).files)
    m = len(flowers.x)
    picked = np.random.default_rng(0).choice(m, n, replace=False)
    u0 = duplicates.unit_rows(flowers.x)
    distinct = u0 @ u0.T
    closest = np.sort(distinct[np.triu_indices(m, 1)])[::-1][:5]
    print(f"the 5 closest pairs of distinct sample photos: {' '.join(f'{v:.3f}' for v in closest)}")
    for severity, kinds in COPIES.items():
        made = [
            c for i in picked for c in copies_of(Path(files[flowers.positions[i]].url).read_bytes(), kinds)
        ]
        u = duplicates.unit_rows(np.concatenate([flowers.x, network_features(made, model_dir)]))
        original = np.repeat(picked, len(kinds))
        cosine = np.einsum("nd,nd->n", u[m:], u[original])
        print(f"{severity} copies of {n} photos, cosine to the original:")
        for k, (name, *_) in enumerate(kinds):
            c = cosine[k :: len(kinds)]
            print(f"  {name:16s} min {c.min():.3f}  5% {np.quantile(c, 0.05):.3f}  median {np.median(c):.3f}")
        found = duplicates.pairs(u)
        owner = np.concatenate([np.arange(m), original])  # the photo each row shows
        same = owner[found[:, 0]] == owner[found[:, 1]]
        truth = {(int(o), m + k) for k, o in enumerate(original)}
        hit = sum((int(i), int(j)) in truth for i, j in found.tolist())
        print(
            f"  at the threshold {duplicates.THRESHOLD}: {len(found)} pairs, {int(same.sum())} of one photo "
            f"(precision {same.mean() if len(found) else float('nan'):.3f}); planted pairs found {hit} of "
            f"{len(truth)} (recall {hit / len(truth):.3f})"
        )
    return flowers.x


def at_scale(like: np.ndarray, n: int, planted_n: int = 1000) -> None:
    """The search on ``n`` rows drawn like the rows of ``like`` (mean and covariance)."""
    rng = np.random.default_rng(0)
    mean = like.mean(axis=0)
    _, s, vt = np.linalg.svd(like - mean, full_matrices=False)
    basis = (s[:, None] * vt / np.sqrt(len(like))).astype(np.float32)
    x = np.empty((n, like.shape[1]), np.float32)
    for start in range(0, n, 10000):
        rows = min(10000, n - start)
        x[start : start + rows] = mean + rng.standard_normal((rows, len(s)), np.float32) @ basis
    sources = rng.choice(n - planted_n, planted_n, replace=False)
    noise = 0.2 * float(np.linalg.norm(x[:100], axis=1).mean()) / np.sqrt(x.shape[1])
    x[n - planted_n :] = x[sources] + rng.normal(0, noise, (planted_n, x.shape[1]))
    started = time.perf_counter()
    u = duplicates.unit_rows(x)
    del x
    found = duplicates.pairs(u)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    truth = {(int(s), n - planted_n + k) for k, s in enumerate(sources)}
    hit = sum((int(i), int(j)) in truth for i, j in found.tolist())
    planted_cos = duplicates.similar(u, np.array(sorted(truth)))
    print(
        f"\n{n:,} synthetic rows of {u.shape[1]} (flower-like), 1,000 planted copies (cosine "
        f"{planted_cos.min():.3f}-{planted_cos.max():.3f}): search {seconds:.1f} s, peak RSS {peak:,.0f} MiB "
        f"(the unit rows alone {u.nbytes / 2**20:,.0f} MiB); {len(found)} pairs, planted found {hit} "
        f"(recall {hit / planted_n:.3f}, precision {hit / max(len(found), 1):.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("ood", "labels", "calibration", "cost", "duplicates"))
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--bottleneck-dir", default="/tmp/lastlayer-bench-trust/bottleneck")
    parser.add_argument("--model-dir", default="/tmp/lastlayer-bench-trust/models")
    parser.add_argument("--fashion", type=int, default=500, help="Fashion-MNIST test images")
    parser.add_argument("--seeds", type=int, default=3, help="copies with labels moved (labels)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (cost)")
    parser.add_argument("--copies", type=int, default=60, help="photos copied (duplicates)")
    parser.add_argument("--scale", type=int, default=200000, help="synthetic rows (duplicates; 0: none)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    folders = (args.images, args.bottleneck_dir, args.model_dir)
    if args.what != "ood":
        if args.what == "labels":
            label_check(*folders, args.seeds)
        elif args.what == "duplicates":
            like = planted(*folders, args.copies)
            if args.scale:
                at_scale(like, args.scale)
        elif args.what == "calibration":
            calibration_check(*folders)
        else:
            cost_check(*folders, args.rounds)
        print(f"({time.perf_counter() - started:.0f} s)")
        return 0
    flowers = flower_features(args.images, args.bottleneck_dir, args.model_dir)
    files = {"Fashion-MNIST": fashion_images(args.fashion), "non-flower photos": photo_images()}
    outside = {k: network_features(v, args.model_dir) for k, v in files.items()}
    candidates(flowers, outside)
    end_to_end(args.images, args.bottleneck_dir, args.model_dir, files)
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
