"""Where a local Spark engine's start-up goes: each phase timed, in one fresh process.

    PYTHONPATH=src python benchmarks/spark_phases.py [--images DIR] [--master local[2]] [--count 10]

Prints the seconds of: the JVM's launch (pyspark's gateway up), the session (SparkContext and
SparkSession), a first tiny job (2 tasks doing nothing: the Python daemon and workers start, the
JVM's first job), a second tiny job (what any job costs), then the Spark engine's extraction of
``--count`` images on an empty cache, twice: the first pays what a worker's first task imports, the
model's broadcast and each worker's onnxruntime session; the second is the steady state. Run it with
another lastlayer's ``src`` first on ``PYTHONPATH`` (e.g. ``git archive main src | tar -x -C /tmp/old``)
to compare.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench_spark import DEFAULT_IMAGES

MARKS: list[tuple[str, float]] = []


def mark(what: str) -> None:
    """Print the seconds since the last mark, and what they were."""
    now = time.perf_counter()
    print(f"{now - MARKS[-1][1]:7.2f} s  {what}", flush=True)
    MARKS.append((what, now))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--count", type=int, default=10, help="images extracted (the first of each class)")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lastlayer-bench-models"
    )
    args = parser.parse_args()
    import pyspark.core.context as context  # pyspark 4: where SparkContext launches its gateway

    from lastlayer.bottlenecks.needs import compute_bottlenecks
    from lastlayer.dataset import scan
    from lastlayer.engines import spark
    from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

    model = load_feature_model(DEFAULT_ARCHITECTURE, str(args.model_dir))
    with tempfile.TemporaryDirectory() as tmp:
        classes = sorted(p for p in args.images.iterdir() if p.is_dir())
        for image in [i for c in classes for i in sorted(c.iterdir())[: -(-args.count // len(classes))]]:
            Path(tmp, "images", image.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, Path(tmp, "images", image.parent.name, image.name))
        images = scan(str(Path(tmp, "images")), 10, 10)
        launch = context.launch_gateway

        def timed_launch(*a: object, **kw: object) -> object:
            gateway = launch(*a, **kw)
            mark("JVM launched (pyspark's gateway up)")
            return gateway

        context.launch_gateway = timed_launch
        MARKS.append(("start", time.perf_counter()))
        with spark.SparkEngine(args.master) as engine:
            sc = engine.spark().sparkContext
            mark("session (SparkContext, SparkSession)")
            sc.setLogLevel("ERROR")
            for which in ("first", "second"):
                sc.parallelize(range(2), 2).map(abs).collect()
                mark(f"{which} tiny job")
            for which in ("first", "second"):
                compute_bottlenecks(images, model, str(Path(tmp, which)), engine)
                mark(f"{which} extraction of {len(images.files)} images")


if __name__ == "__main__":
    main()
