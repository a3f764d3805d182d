"""The Spark engine against the local engine, side by side in one run, on the same images.

    python benchmarks/bench_spark.py [--images DIR] [--copies 5] [--master local[2]] [--rounds 3]

The images are ``--images`` copied ``--copies`` times, each copy made distinct (bench.py's
``repeated_copy``: 3,655 images for the flower sample). Each round runs, each in a fresh process and
on an empty cache: the local engine (files on disk to the Parquet cache), then the Spark engine with
Spark's start-up included (JVM, session, Python workers, the model broadcast; printed: whether the
JVM mapped the class-data sharing archive of Spark's classes that a first run writes), then, in that
same Spark session, a second extraction on another empty cache (the steady state a long job sees), then
the local engine again (the reference is the mean of its two runs). Prints images/s and the ratios

    Spark images/s, steady state / local images/s              [target >= 0.95]
    Spark images/s (start-up included) / local images/s        [target >= 0.75]

as the median over rounds with their spread (the machine's speed drifts), the same ratios of the
best rounds, the CPU seconds per image of each engine (all the processes of the run: on a machine
shared with other work, the figure least moved by it), and the Spark images/s per core that
docs/spark.md projects from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench import repeated_copy

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
    """One measurement in this (fresh) process; returns its timings and the CPU seconds of its last
    extraction."""
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
    tick = time.perf_counter()
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
        out["cores"] = session.sparkContext.defaultParallelism
        out["process_s"] = time.perf_counter() - start
    return out


def archive_state(java_options: str) -> str:
    """What the JVM did with the class-data sharing archive of Spark's classes (engines/jvm.py)."""
    if "-XX:SharedArchiveFile=" in java_options:
        return "mapped"
    return "written at exit" if "-XX:ArchiveClassesAtExit=" in java_options else "none"


def run_child(engine: str, args: argparse.Namespace, work: Path) -> dict:
    argv = [sys.executable, __file__, "--child", engine, "--images", str(args.images)]
    argv += ["--model-dir", str(args.model_dir), "--master", args.master, "--work", str(work)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
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
    parser.add_argument("--child", choices=("local", "spark"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.images), str(args.model_dir), args.master, args.work)))
        return 0
    if not args.images.is_dir():
        print(f"no images at {args.images}: pass --images DIR (a folder of class folders)", file=sys.stderr)
        return 2
    from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

    load_feature_model(DEFAULT_ARCHITECTURE, str(args.model_dir))  # built once, outside the timings
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; images: {args.images} x {args.copies}; Spark master {args.master}"
    )
    with tempfile.TemporaryDirectory() as copies:
        if args.copies > 1:
            args.images = repeated_copy(args.images, Path(copies), args.copies)
        rounds = [measure(args, r) for r in range(args.rounds)]
    print()
    local = [(r["before"] + r["after"]) / 2 for r in rounds]
    best_local = min(t for r in rounds for t in (r["before"], r["after"]))
    steady, first = [r["steady"] for r in rounds], [r["start"] + r["first"] for r in rounds]
    report("Spark steady state / local", [a / b for a, b in zip(local, steady, strict=True)], 0.95)
    report("Spark (start-up included) / local", [a / b for a, b in zip(local, first, strict=True)], 0.75)
    print(
        f"best of rounds (the least disturbed by other load): steady {best_local / min(steady):.3f}, "
        f"start-up included {best_local / min(first):.3f}"
    )
    n = rounds[0]["images"]
    local_cpu = float(np.median([r["local_cpu"] for r in rounds]))
    spark_cpu = float(np.median([r["spark_cpu"] for r in rounds]))
    print(
        f"CPU per image, median of rounds (hardly moved by other load): local engine "
        f"{1000 * local_cpu / n:.2f} ms, Spark steady state {1000 * spark_cpu / n:.2f} ms (driver, JVM "
        f"and Python workers); local / Spark {local_cpu / spark_cpu:.3f}"
    )
    per_core = [n / r["steady"] / r["cores"] for r in rounds]
    print(f"Spark steady state per core: {float(np.median(per_core)):.0f} img/s")
    return 0


def measure(args: argparse.Namespace, r: int) -> dict[str, Any]:
    """One round's seconds: the local engine ``before`` and ``after`` the Spark engine's ``start``,
    ``first`` and ``steady`` extractions (so that the machine's drift weighs on both sides)."""
    with tempfile.TemporaryDirectory() as tmp:
        before = run_child("local", args, Path(tmp) / "before")
        remote = run_child("spark", args, Path(tmp))
        after = run_child("local", args, Path(tmp) / "after")
    n = before["computed"]
    times = {"before": before["extract_s"], "after": after["extract_s"], "start": remote["start_s"]}
    times |= {"first": remote["first_s"], "steady": remote["steady_s"], "cores": remote["cores"], "images": n}
    times |= {"archive": remote["archive"]}
    times |= {"local_cpu": (before["cpu_s"] + after["cpu_s"]) / 2, "spark_cpu": remote["cpu_s"]}
    spark_s = f"{times['start']:.2f} s (class-data archive: {times['archive']})"
    spark_s += f" + first extraction {times['first']:.2f} s"
    print(
        f"round {r + 1}: {n} images; local engine {times['before']:.2f} s before, {times['after']:.2f} s "
        f"after = {2 * n / (times['before'] + times['after']):.0f} img/s; Spark start-up {spark_s} = "
        f"{n / (times['start'] + times['first']):.0f} img/s; steady (same session, new cache) "
        f"{times['steady']:.2f} s = {n / times['steady']:.0f} img/s",
        flush=True,
    )
    return times


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
