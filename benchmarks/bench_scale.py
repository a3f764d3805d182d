"""lastlayer at scale on one machine: a synthetic collection of tiny images, both engines, and how each
cost grows with the number of images.

    python benchmarks/bench_scale.py [--sizes 50000 100000] [--largest] [--engines local spark]
                                     [--work /tmp/lastlayer-scale] [--dim 256] [--steps 4000]

Builds under ``--work`` (never in the repository) a collection of 16x16 PNGs in four class folders
(each image distinct: class colour plus noise) and a tiny ONNX feature extractor that follows
docs/custom-models.md (a flattening, one matrix product to ``--dim`` features and a tanh), so that the
network costs almost nothing and what is measured is lastlayer's own work: listing, reading, hashing,
decoding, the cache, the passes over it and training. Then, for each size and engine, a cold
``lastlayer retrain`` (retrain.py's default 4,000 steps) in a fresh process, reporting:

* wall time and images/s (whole run, Spark's start included);
* driver peak RSS (VmHWM of the ``lastlayer`` process; with Spark, without its JVM);
* executor peak RSS: with Spark, the largest of its Python workers (``local[2]``: separate
  processes, polled every 0.2 s) and the JVM; with the local engine the executors are the driver's
  own threads;
* part files written per 1,000 images (the cache's files after the run);
* and, over the sizes, the fitted growth of each (the exponent b of ``value ~ N^b``, and the
  ratio from the smallest to the largest size). Targets: driver peak RSS grows less than 1.2x from
  50,000 to 200,000 images; wall time grows at most linearly (b <= 1).

``--largest`` adds 200,000 images (about ten minutes more on two cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from bench import machine
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

SIDE = 16
CLASSES = 4
LARGEST = 200_000
#: Seconds between looks at the run's processes.
POLL_S = 0.2
RUN_TIMEOUT_S = 3600

CHILD = """
import json, sys
import lastlayer
from lastlayer.settings.options import parse_flags
summary = lastlayer.retrain(**parse_flags(json.loads(sys.argv[1])).api_kwargs())
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"driver_rss": int(hwm.split()[1]) * 1024, "summary": summary.to_dict()}))
"""


def make_pool(folder: Path, n: int) -> None:
    """``n`` distinct 16x16 PNGs, ``n / CLASSES`` per class folder (made once; kept for later runs)."""
    done = folder / f".done-{n}"
    if done.exists():
        return
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 215, (CLASSES, 3))
    for c in range(CLASSES):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n // CLASSES):
            pixels = np.clip(colours[c] + rng.normal(0, 40, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"class_{c}" / f"img_{i:06d}.png", compress_level=1)
    done.touch()


def collection(pool: Path, folder: Path, n: int) -> Path:
    """The first ``n / CLASSES`` images of each class of ``pool``, hard-linked into ``folder``."""
    if not folder.is_dir():
        for c in range(CLASSES):
            (folder / f"class_{c}").mkdir(parents=True)
            for i in range(n // CLASSES):
                name = f"class_{c}/img_{i:06d}.png"
                os.link(pool / name, folder / name)
    return folder


def tiny_model(path: Path, dim: int) -> Path:
    """An ONNX feature extractor per docs/custom-models.md: NHWC float32 [N, 16, 16, 3] in, [N, dim]
    out (a flattening, a fixed random matrix, tanh)."""
    weights = np.random.default_rng(1).normal(0, 0.05, (SIDE * SIDE * 3, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["product"]),
            helper.make_node("Tanh", ["product"], ["features"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", SIDE, SIDE, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "lastlayer.preprocessing": json.dumps(
                {"size": SIDE, "central_fraction": 1.0, "mean": [0, 0, 0], "std": [255, 255, 255]}
            )
        },
    )
    onnx.save(model, str(path))
    return path


def descendants(root: int) -> list[int]:
    """The processes below ``root``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def peak_of(pid: int) -> tuple[str, int] | None:
    """The kind (``python worker``, ``jvm``, ``other``) and VmHWM of process ``pid``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    kind = "python worker" if "pyspark.daemon" in cmdline else "jvm" if "java" in cmdline else "other"
    return kind, hwm


def run(flags: list[str]) -> tuple[float, dict, dict[str, int]]:
    """Wall seconds, the child's report, and the peak RSS of its descendants by kind."""
    peaks: dict[str, int] = {}
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(flags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(POLL_S):
            for pid in descendants(child.pid):
                found = peak_of(pid)
                if found is not None:
                    peaks[found[0]] = max(peaks.get(found[0], 0), found[1])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = child.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop.set()
        watcher.join(5)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"the run failed ({child.returncode}):\n{err[-3000:]}")
    return seconds, json.loads(out.strip().splitlines()[-1]), peaks


def growth(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """The exponent b of a least-squares fit ``value ~ N^b``, and the largest size's value over the
    smallest's."""
    if len(sizes) < 2 or min(values) <= 0:
        return math.nan, math.nan
    b = float(np.polyfit(np.log(sizes), np.log(values), 1)[0])
    return b, values[-1] / values[0]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument("--largest", action="store_true", help=f"add {LARGEST:,} images")
    parser.add_argument("--engines", nargs="+", default=["local", "spark"], choices=["local", "spark"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lastlayer-scale"))
    parser.add_argument("--dim", type=int, default=256, help="features of the tiny network")
    parser.add_argument("--steps", type=int, default=4000, help="training steps (retrain.py's default)")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes + ([LARGEST] if args.largest else [])))
    print(f"{machine()}; sizes {sizes}, engines {args.engines}, {args.dim} features, {args.steps} steps")
    pool = args.work / "pool"
    started = time.perf_counter()
    make_pool(pool, max(sizes))
    print(f"collection of {max(sizes):,} images ready in {time.perf_counter() - started:.0f} s")
    model = tiny_model(args.work / "tiny.onnx", args.dim)
    results: dict[str, list[dict[str, float]]] = {engine: [] for engine in args.engines}
    for n in sizes:
        images = collection(pool, args.work / f"images-{n}", n)
        for engine in args.engines:
            work = args.work / f"run-{engine}-{n}"
            shutil.rmtree(work, ignore_errors=True)
            flags = [
                f"--image_dir={images}",
                f"--architecture={model}",
                f"--bottleneck_dir={work / 'cache'}",
                f"--output_graph={work / 'out' / 'g.onnx'}",
                f"--output_labels={work / 'out' / 'l.txt'}",
                f"--summaries_dir={work / 'out' / 's'}",
                f"--how_many_training_steps={args.steps}",
                "--random_seed=1",
                "--report=false",
                f"--engine={engine}",
                *(["--spark_master=local[2]"] if engine == "spark" else []),
            ]
            seconds, report, peaks = run(flags)
            summary = report["summary"]
            files = sum(1 for p in (work / "cache").rglob("part-*.parquet") if "_staging" not in p.parts)
            row = {
                "n": n,
                "wall_s": seconds,
                "images_per_s": n / seconds,
                "driver_rss_mib": report["driver_rss"] / 2**20,
                "worker_rss_mib": peaks.get("python worker", 0) / 2**20,
                "jvm_rss_mib": peaks.get("jvm", 0) / 2**20,
                "files_per_1000": files * 1000 / n,
                "accuracy": summary["metrics"]["validation_and_test_accuracy"] or 0.0,
            }
            results[engine].append(row)
            print(
                f"{engine:5s} {n:>7,} images: {seconds:7.1f} s = {row['images_per_s']:6.0f} img/s; "
                f"driver peak RSS {row['driver_rss_mib']:.0f} MiB; executors: Python workers "
                f"{row['worker_rss_mib']:.0f} MiB, JVM {row['jvm_rss_mib']:.0f} MiB; {files} files "
                f"({row['files_per_1000']:.2f} per 1,000 images); accuracy {100 * row['accuracy']:.1f}%; "
                f"stages {summary['timings']}",
                flush=True,
            )
            shutil.rmtree(work / "cache", ignore_errors=True)
    print()
    print(
        "| engine | measure | "
        + " | ".join(f"{n:,}" for n in sizes)
        + " | growth exponent b | largest / smallest |"
    )
    print("|---|---|" + "---|" * len(sizes) + "---|---|")
    for engine, rows in results.items():
        for key, label in (
            ("wall_s", "wall time, s"),
            ("images_per_s", "images/s"),
            ("driver_rss_mib", "driver peak RSS, MiB"),
            ("worker_rss_mib", "executor (Python worker) peak RSS, MiB"),
            ("jvm_rss_mib", "JVM peak RSS, MiB"),
            ("files_per_1000", "files per 1,000 images"),
        ):
            values = [r[key] for r in rows]
            if not any(values):
                continue
            b, ratio = growth(sizes, values)
            cells = " | ".join(f"{v:.2f}" if key == "files_per_1000" else f"{v:.0f}" for v in values)
            print(f"| {engine} | {label} | {cells} | {b:.2f} | {ratio:.2f} |")
    print()
    for engine, rows in results.items():
        if len(rows) < 2:
            continue
        rss = rows[-1]["driver_rss_mib"] / rows[0]["driver_rss_mib"]
        wall_b, _ = growth(sizes, [r["wall_s"] for r in rows])
        span = f"{sizes[0]:,} -> {sizes[-1]:,} images"
        print(f"{engine}: driver peak RSS x{rss:.2f} for {span} [target < 1.2] {verdict(rss < 1.2)}")
        print(f"{engine}: wall time ~ N^{wall_b:.2f} [target <= 1: at most linear] {verdict(wall_b <= 1.0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
