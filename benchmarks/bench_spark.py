"""The Spark engine against the local engine, side by side in one run, on the same images.

    python benchmarks/bench_spark.py [--images DIR] [--copies 5] [--master local[2]] [--rounds 3]
                                     [--baseline-src DIR]

The images are ``--images`` copied ``--copies`` times, each copy made distinct (bench.py's
``repeated_copy``: 3,655 images for the flower sample). Each round runs, each in a fresh process and
on an empty cache: the local engine (files on disk to the Parquet cache), then the Spark engine with
Spark's start-up included (JVM, session, Python workers, the model broadcast; printed: whether the
JVM mapped the class-data sharing archive of Spark's classes that a first run writes), then, in that
same Spark session, a second extraction on another empty cache (the steady state a long job sees), then
the local engine again (the reference is the mean of its two runs). With ``--baseline-src`` the Spark
engine of another lastlayer (an earlier commit's ``src``) runs as well in each round, the two in
alternating order, against the same local runs: before and after a change, side by side. Prints
images/s and, for each Spark engine, the ratios

    Spark images/s, steady state / local images/s              [target >= 0.95]
    Spark images/s (start-up included) / local images/s        [target >= 0.75]

as the median over rounds with their spread (the machine's speed drifts), the same ratios of the
best rounds, the CPU seconds per image of each engine (all the processes of the run: on a machine
shared with other work, the figure least moved by it; for Spark also of its start-up and first
extraction together), and the Spark images/s per core that
docs/spark.md projects from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench import machine, missing_images, repeated_copy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "flower_photos_sample"
CHILD_TIMEOUT_S = 900


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its live descendants (for Spark: the JVM,
    the Python daemon and its reused workers)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
        cpu[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | more, bool(more)
    return sum(cpu.get(p, 0.0) for p in tree)


def child(engine: str, images: str, model_dir: str, master: str, work: str) -> dict:
    """One measurement in this (fresh) process; returns its timings, the CPU seconds of its last
    extraction and (Spark) of its start-up and first extraction."""
    start = time.perf_counter()
    from lastlayer.bottlenecks.needs import compute_bottlenecks
    from lastlayer.dataset import scan
    from lastlayer.engines.local import LocalEngine
    from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

    model = load_feature_model(DEFAULT_ARCHITECTURE, model_dir)
    image_set = scan(images, 10, 10)
    out: dict = {"images": len(image_set.files)}
    if engine == "local":
        tick, cpu = time.perf_counter(), tree_cpu_s(os.getpid())
        done = compute_bottlenecks(image_set, model, os.path.join(work, "local"), LocalEngine())
        out["computed"], out["extract_s"] = done.computed, time.perf_counter() - tick
        out["cpu_s"] = tree_cpu_s(os.getpid()) - cpu
        return out
    tick, start_cpu = time.perf_counter(), tree_cpu_s(os.getpid())
    from lastlayer.engines import spark

    with spark.SparkEngine(master) as engine:
        session = engine.spark()
        session.sparkContext.setLogLevel("ERROR")
        out["start_s"] = time.perf_counter() - tick
        out["archive"] = archive_state(
            session.sparkContext.getConf().get("spark.driver.defaultJavaOptions", "")
        )
        for name in ("first", "steady"):
            tick, cpu = time.perf_counter(), tree_cpu_s(os.getpid())
            done = compute_bottlenecks(image_set, model, os.path.join(work, name), engine)
            out[f"{name}_s"], out["computed"] = time.perf_counter() - tick, done.computed
            out["cpu_s"] = tree_cpu_s(os.getpid()) - cpu
            if name == "first":  # the start-up's and first extraction's (not the dead launcher JVM's)
                out["first_cpu_s"] = tree_cpu_s(os.getpid()) - start_cpu
        out["cores"] = session.sparkContext.defaultParallelism
        out["process_s"] = time.perf_counter() - start
    return out


def archive_state(java_options: str) -> str:
    """What the JVM did with the class-data sharing archive of Spark's classes (engines/jvm.py)."""
    if "-XX:SharedArchiveFile=" in java_options:
        return "mapped"
    return "written at exit" if "-XX:ArchiveClassesAtExit=" in java_options else "none"


def run_child(engine: str, args: argparse.Namespace, work: Path, src: Path | None = None) -> dict:
    """The measurement of ``engine`` in a fresh process, with ``src`` first on its ``PYTHONPATH``."""
    argv = [sys.executable, __file__, "--child", engine, "--images", str(args.images)]
    argv += ["--model-dir", str(args.model_dir), "--master", args.master, "--work", str(work)]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--copies", type=int, default=5, help="distinct copies of --images (1: as they are)")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lastlayer-bench-models"
    )
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="also run, in each round, the Spark engine of the lastlayer package under this folder (e.g. "
        "an earlier commit's: git archive main src | tar -x -C /tmp/old; then /tmp/old/src)",
    )
    parser.add_argument("--child", choices=("local", "spark"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.images), str(args.model_dir), args.master, args.work)))
        return 0
    if missing_images(args.images):
        return 2
    from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

    load_feature_model(DEFAULT_ARCHITECTURE, str(args.model_dir))  # built once, outside the timings
    print(f"{machine()}; images: {args.images} x {args.copies}; Spark master {args.master}")
    with tempfile.TemporaryDirectory() as copies:
        if args.copies > 1:
            args.images = repeated_copy(args.images, Path(copies), args.copies)
        rounds = [measure(args, r) for r in range(args.rounds)]
    n = rounds[0]["images"]
    local = [(r["before"] + r["after"]) / 2 for r in rounds]
    best_local = min(t for r in rounds for t in (r["before"], r["after"]))
    local_cpu = float(np.median([r["local_cpu"] for r in rounds]))
    for label in rounds[0]["spark"]:
        runs = [r["spark"][label] for r in rounds]
        steady, first = [s["steady_s"] for s in runs], [s["start_s"] + s["first_s"] for s in runs]
        print(f"\n{label}:")
        report("Spark steady state / local", [a / b for a, b in zip(local, steady, strict=True)], 0.95)
        report("Spark (start-up included) / local", [a / b for a, b in zip(local, first, strict=True)], 0.75)
        print(
            f"best of rounds (the least disturbed by other load): steady {best_local / min(steady):.3f}, "
            f"start-up included {best_local / min(first):.3f}"
        )
        spark_cpu = float(np.median([s["cpu_s"] for s in runs]))
        first_cpu = float(np.median([s["first_cpu_s"] for s in runs]))
        print(
            f"CPU per image, median of rounds (hardly moved by other load): local engine "
            f"{1000 * local_cpu / n:.2f} ms, Spark steady state {1000 * spark_cpu / n:.2f} ms (driver, JVM "
            f"and Python workers); local / Spark {local_cpu / spark_cpu:.3f}; Spark start-up and first "
            f"extraction {1000 * first_cpu / n:.2f} ms, local / that {local_cpu / first_cpu:.3f}"
        )
        per_core = [n / s["steady_s"] / s["cores"] for s in runs]
        print(f"Spark steady state per core: {float(np.median(per_core)):.0f} img/s")
    return 0


def measure(args: argparse.Namespace, r: int) -> dict[str, Any]:
    """One round: the local engine's seconds ``before`` and ``after`` the Spark engine's runs (so that
    the machine's drift weighs on both sides); with ``--baseline-src``, the baseline's Spark run too,
    first in every other round."""
    runs = [("this code", None)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    runs = runs[::-1] if r % 2 else runs
    with tempfile.TemporaryDirectory() as tmp:
        before = run_child("local", args, Path(tmp) / "before")
        spark = {
            label: run_child("spark", args, Path(tmp) / str(i), src) for i, (label, src) in enumerate(runs)
        }
        after = run_child("local", args, Path(tmp) / "after")
    n = before["computed"]
    round_ = {"before": before["extract_s"], "after": after["extract_s"], "images": n}
    round_ |= {"local_cpu": (before["cpu_s"] + after["cpu_s"]) / 2, "spark": dict(sorted(spark.items()))}
    line = (
        f"round {r + 1}: {n} images; local engine {before['extract_s']:.2f} s before, "
        f"{after['extract_s']:.2f} s after = {2 * n / (before['extract_s'] + after['extract_s']):.0f} img/s"
    )
    for label, _ in runs:
        s = spark[label]
        line += (
            f"; Spark ({label}) start-up {s['start_s']:.2f} s (class-data archive: {s['archive']}) + first "
            f"extraction {s['first_s']:.2f} s = {n / (s['start_s'] + s['first_s']):.0f} img/s, steady (same "
            f"session, new cache) {s['steady_s']:.2f} s = {n / s['steady_s']:.0f} img/s"
        )
    print(line, flush=True)
    return round_


def report(what: str, ratios: list[float], target: float) -> None:
    """The median ratio over rounds, its spread, and whether it meets ``target``."""
    median = float(np.median(ratios))
    verdict = "ok" if median >= target else "MISSED"
    print(
        f"{what}, median of {len(ratios)} rounds: {median:.3f} (spread {min(ratios):.3f}-{max(ratios):.3f})"
        f"  [target >= {target}] {verdict}"
    )


if __name__ == "__main__":
    sys.exit(main())
