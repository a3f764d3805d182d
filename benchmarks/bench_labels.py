"""lastlayer benchmark: the labels file (--labels_file).

    python benchmarks/bench_labels.py same [--images DIR]   # labels file vs class folders, same model
    python benchmarks/bench_labels.py rows [--rows N]       # peak RSS reading a labels file of N rows
    python benchmarks/bench_labels.py multi [--folds K]     # --multi_label: mAP, micro-F1 by K folds

same: retrains on the flower sample twice with one seed and one cache: from its class folders, then
from a labels file that lists the same images with their folders' labels and no split column (so
retrain.py's hash of the path gives the same split); prints both runs' accuracies, confusion matrices
and whether the two exported models' weights are identical.

rows: writes a CSV of N rows (the sample's images, then rows naming images that do not exist, which
are counted as bad rows and skipped) and reads it with read_labels in a fresh process, for N/10 and N
rows, and a process that only imports lastlayer; prints the peak RSS of each and the bytes per row
the reading adds.

multi: a multi-label set from the sample: every photo once (its class), plus one collage per two photos
(two photos of different classes, each resized to 224 x 224, side by side; labels = both classes),
written with a labels file under the working folder. The images are dealt into K seeded folds; fold f
is the test split, fold f+1 the validation split (thresholds), the rest training; each fold is one
``--multi_label`` run on the same feature cache (computed by the first). Prints each fold's mAP,
micro-F1, macro-F1 and exact-match ratio on its test split, and their means and standard deviations.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from bench import DEFAULT_IMAGES
from onnx import numpy_helper
from PIL import Image

import lastlayer
from lastlayer.dataset import scan
from lastlayer.settings.run import CacheConfig, OutputConfig, TrainingConfig


def write_labels(images: str, path: Path, extra_rows: int = 0) -> int:
    """A CSV of the folder scan's images and labels, then ``extra_rows`` rows naming no image."""
    found = scan(images, 10, 10)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label"])
        for image in found.files:
            out.writerow([image.relpath, found.labels[image.label_index]])
        for i in range(extra_rows):
            out.writerow([f"elsewhere/{i // 1000}/img_{i}.jpg", found.labels[i % len(found.labels)]])
    return len(found.files) + extra_rows


def weights(graph: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(graph)).graph.initializer}


def same(images: str, work: Path, model_dir: str, steps: int) -> None:
    labels_file = work / "labels.csv"
    write_labels(images, labels_file)
    runs = {}
    for name, file in (("class folders", ""), ("labels file", str(labels_file))):
        out = work / name.replace(" ", "_")
        started = time.perf_counter()
        summary = lastlayer.retrain(
            images,
            training=TrainingConfig(how_many_training_steps=steps, random_seed=11, labels_file=file),
            cache=CacheConfig(model_dir=model_dir, bottleneck_dir=str(work / "bottleneck")),
            outputs=OutputConfig(
                output_graph=str(out / "g.onnx"),
                output_labels=str(out / "l.txt"),
                summaries_dir=str(out / "s"),
            ),
        )
        runs[name] = (summary, out / "g.onnx")
        m = summary.metrics
        print(
            f"{name:14s} test accuracy {m.test_accuracy:.4f} (n={m.test_n}), validation+test "
            f"{m.validation_and_test_accuracy:.4f}, splits {summary.label_source['splits']}, "
            f"{time.perf_counter() - started:.1f} s"
        )
    (a, ga), (b, gb) = runs.values()
    wa, wb = weights(ga), weights(gb)
    identical = wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    matrix = a.confusion_matrix.matrix == b.confusion_matrix.matrix
    print(
        f"same images per split: {a.images == b.images}; same confusion matrix: {matrix}; "
        f"identical weights: {identical}"
    )


def rows(images: str, work: Path, n: int) -> None:
    code = (
        "import json, resource, sys, time; from lastlayer.labels import read_labels; "
        "t = time.perf_counter(); "
        "s = read_labels(sys.argv[1], sys.argv[2], (10, 10)) if len(sys.argv) > 2 else None; "
        "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
        "'images': len(s.files) if s else 0, 's': time.perf_counter() - t}))"
    )
    base = json.loads(
        subprocess.run(
            [sys.executable, "-c", code, images], capture_output=True, check=True, text=True
        ).stdout
    )
    print(f"import only: peak RSS {base['rss'] / 2**20:.0f} MiB")
    for count in (n // 10, n):
        path = work / f"labels_{count}.csv"
        write_labels(images, path, count - len(scan(images, 10, 10).files))
        done = subprocess.run(
            [sys.executable, "-c", code, images, str(path)], capture_output=True, text=True, check=True
        )
        got = json.loads(done.stdout.strip().splitlines()[-1])
        size, rss = path.stat().st_size / 2**20, got["rss"] / 2**20
        per_row = (got["rss"] - base["rss"]) / count
        print(
            f"{count:>9,} rows ({size:.0f} MiB file): peak RSS {rss:.0f} MiB, {per_row:.0f} bytes/row over "
            f"the import, {got['images']} images kept, read in {got['s']:.1f} s"
        )


def collages(images: str, folder: Path, seed: int) -> list[tuple[str, list[str]]]:
    """Copy every photo of ``images`` under ``folder/single`` and write one collage per two photos
    under ``folder/collage``; returns each image's relative path and labels."""
    found = scan(images, 10, 10)
    files = list(found.files)
    rows: list[tuple[str, list[str]]] = []
    for image in files:
        target = folder / "single" / image.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(image.url).read_bytes())
        rows.append((f"single/{image.relpath}", [found.labels[image.label_index]]))
    rng = np.random.default_rng(seed)
    (folder / "collage").mkdir(parents=True, exist_ok=True)
    for i in range(len(files) // 2):
        a, b = rng.choice(len(files), 2, replace=False)
        while files[a].label_index == files[b].label_index:
            b = int(rng.integers(len(files)))
        canvas = Image.new("RGB", (448, 224))
        for x, j in ((0, a), (224, b)):
            with Image.open(files[j].url) as photo:
                canvas.paste(photo.convert("RGB").resize((224, 224)), (x, 0))
        canvas.save(folder / "collage" / f"c_{i:04d}.jpg", quality=90)
        labels = [found.labels[files[a].label_index], found.labels[files[b].label_index]]
        rows.append((f"collage/c_{i:04d}.jpg", labels))
    return rows


def multi(images: str, work: Path, model_dir: str, steps: int, k: int) -> None:
    rows = collages(images, work / "images", seed=5)
    fold = np.random.default_rng(6).permutation(len(rows)) % k
    print(
        f"{len(rows)} images: {sum(len(x) == 1 for _, x in rows)} photos, "
        f"{sum(len(x) == 2 for _, x in rows)} collages"
    )
    scores = []
    for f in range(k):
        split = np.where(fold == f, "testing", np.where(fold == (f + 1) % k, "validation", "training"))
        labels_file = work / f"fold_{f}.jsonl"
        lines = [
            json.dumps({"path": p, "labels": x, "split": str(s)})
            for (p, x), s in zip(rows, split, strict=True)
        ]
        labels_file.write_text("\n".join(lines) + "\n")
        out = work / f"fold_{f}"
        started = time.perf_counter()
        summary = lastlayer.retrain(
            str(work / "images"),
            training=TrainingConfig(
                how_many_training_steps=steps, random_seed=11, labels_file=str(labels_file), multi_label=True
            ),
            cache=CacheConfig(model_dir=model_dir, bottleneck_dir=str(work / "bottleneck")),
            outputs=OutputConfig(
                output_graph=str(out / "g.onnx"),
                output_labels=str(out / "l.txt"),
                summaries_dir=str(out / "s"),
            ),
        )
        m = summary.multi_label or {}
        scores.append([m["mean_average_precision"], m["micro_f1"], m["macro_f1"], m["exact_match"]])
        print(
            f"fold {f}: mAP {scores[-1][0]:.4f}, micro-F1 {scores[-1][1]:.4f}, macro-F1 {scores[-1][2]:.4f}, "
            f"exact match {scores[-1][3]:.4f} (n={m['test_n']}), {time.perf_counter() - started:.1f} s"
        )
    mean, std = np.mean(scores, axis=0), np.std(scores, axis=0)
    names = ("mAP", "micro-F1", "macro-F1", "exact match")
    print(
        f"{k} folds: " + ", ".join(f"{n} {a:.4f} ± {b:.4f}" for n, a, b in zip(names, mean, std, strict=True))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("same", "rows", "multi"))
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--model-dir", default="/tmp/lastlayer-bench-models")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--work", default="", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.what == "same":
            same(args.images, work, args.model_dir, args.steps)
        elif args.what == "multi":
            multi(args.images, work, args.model_dir, args.steps, args.folds)
        else:
            rows(args.images, work, args.rows)
    print(f"(this process's peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
