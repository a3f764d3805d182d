"""The driver's memory per image: the listing, the cache's keys, the plan and what goes to executors.

    python benchmarks/bench_driver.py [--images 100000 1000000] [--classes 5] [--variants 5]

For each size N, in a fresh process, on a synthetic listing (N names in ``--classes`` class folders,
listed a page at a time as hdfs-native lists HDFS; no files exist) and a warm cache of those N images
(plain features and ``--variants`` distorted variants, feature size 1; the driver holds no features),
measures with ``tracemalloc`` (numpy included) plus Arrow's allocator:

* **listing**: the :class:`~lastlayer.dataset.ImageSet` kept after the scan, and the scan's peak;
* **cache keys**: the two :class:`~lastlayer.bottlenecks.store.FeatureStore` s' lookups (keys and locations),
  and their peak while loading;
* **plan**: what :func:`~lastlayer.bottlenecks.needs.compute_bottlenecks` keeps while the engine runs: each
  image's content key, the tasks, the pending mask (warm: nothing to compute; cold: an empty cache,
  every image a task);
* **to executors**: the pickled need test (:meth:`~lastlayer.bottlenecks.needs.CacheNeed.portable`), which
  Spark broadcasts.

Prints bytes per image for each, their sum, and the projection to 10⁷ images.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from hdfs_native.fsspec import HdfsFileSystem

from lastlayer.bottlenecks import needs as features
from lastlayer.bottlenecks.keys import distortion_key
from lastlayer.bottlenecks.needs import CacheNeed
from lastlayer.bottlenecks.parts import part_schema
from lastlayer.bottlenecks.store import FeatureStore
from lastlayer.dataset import scan
from lastlayer.preprocess import Distortions

CHILD_TIMEOUT_S = 3600
DISTORT = Distortions(flip_left_right=True)
ROWS_PER_PART = 65536
TEN_MILLION = 10**7


class Status(NamedTuple):
    """What hdfs-native's ``list_status`` yields, as far as the scan reads it."""

    path: str
    length: int
    isdir: bool
    modification_time: int


class SyntheticClient:
    """Lists ``n`` made-up JPEG names spread over ``classes`` folders under ``/photos``."""

    def __init__(self, n: int, classes: int) -> None:
        self.n, self.classes = n, classes

    def list_status(self, path: str, recursive: bool = False) -> Iterator[Status]:
        k = int(path.rstrip("/").rsplit("_", 1)[-1])
        for i in range(k, self.n, self.classes):
            yield Status(f"/photos/class_{k}/img_{i:09d}.jpg", 60_000 + i % 997, False, 1_700_000_000_000 + i)


class SyntheticHdfs(HdfsFileSystem):
    """``synthetic://``: an hdfs-native filesystem whose client lists :class:`SyntheticClient` names."""

    protocol = "synthetic"

    def __init__(self, n: int = 0, classes: int = 5, **kwargs: Any) -> None:
        AbstractFileSystem.__init__(self, n=n, classes=classes)
        self.classes = classes
        self.client = SyntheticClient(n, classes)  # type: ignore[assignment]

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The class folders of ``/photos``; the files of a class folder."""
        if path.rstrip("/") == "/photos":
            entries = [
                {"name": f"/photos/class_{k}", "type": "directory", "size": 0} for k in range(self.classes)
            ]
        else:
            entries = [
                {"name": s.path, "type": "file", "size": s.length, "modification_time": s.modification_time}
                for s in self.client.list_status(path)
            ]
        return entries if detail else [e["name"] for e in entries]


def content(relpath: str) -> str:
    return hashlib.sha256(relpath.encode()).hexdigest()


def warm_cache(folder: Path, images: Any, variants: int) -> None:
    """Part files holding every image of ``images`` (feature size 1) and ``variants`` variants of each."""
    rel = [f.relpath for f in images.files]
    stamps = [f.stamp for f in images.files]
    keys = [content(r) for r in rel]
    n = len(rel)
    plain_dir, dist_dir = folder, folder / distortion_key(DISTORT)
    dist_dir.mkdir(parents=True)
    for start in range(0, n, ROWS_PER_PART):
        part = slice(start, start + ROWS_PER_PART)
        write(plain_dir, keys[part], [0] * len(keys[part]), rel[part], stamps[part])
        for v in range(variants):
            write(dist_dir, keys[part], [v] * len(keys[part]), rel[part], [None] * len(keys[part]))


def write(folder: Path, keys: list[str], variants: list[int], rel: list[str], stamps: list[Any]) -> None:
    table = pa.table(
        {
            "content": keys,
            "variant": pa.array(variants, pa.int32()),
            "path": rel,
            "stamp": stamps,
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(len(keys), np.float32)), 1),
            "error": pa.nulls(len(keys), pa.string()),
            "has_feature": pa.array(np.ones(len(keys), bool)),
        },
        schema=part_schema(1),
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none")
    data = sink.getvalue().to_pybytes()
    (folder / f"part-{hashlib.sha256(data).hexdigest()}.parquet").write_bytes(data)


def held(step: Callable[[], Any]) -> tuple[Any, int, int]:
    """``step()``'s value, the bytes it left allocated, and its peak (Python, numpy and Arrow)."""
    gc.collect()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()
    value = step()
    gc.collect()
    now, peak = tracemalloc.get_traced_memory()
    return value, now + pa.total_allocated_bytes() - before, peak + pa.total_allocated_bytes() - before


def child(n: int, classes: int, variants: int) -> dict[str, float]:
    """The measurements for ``n`` images, bytes per image."""
    fsspec.register_implementation("synthetic", SyntheticHdfs, clobber=True)
    options = {"n": n, "classes": classes}
    tracemalloc.start()
    images, listing, listing_peak = held(lambda: scan("synthetic:///photos", 10, 10, options))
    tracemalloc.stop()
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache(Path(tmp), images, variants)
        tracemalloc.start()

        def load() -> tuple[FeatureStore, FeatureStore]:
            return FeatureStore(tmp, 1), FeatureStore(str(Path(tmp) / distortion_key(DISTORT)), 1)

        (plain, distorted), keys, keys_peak = held(load)
        need = CacheNeed(plain, distorted, variants)
        (warm, _, _), plan, plan_peak = held(lambda: features._plan(images, plain, need, (0, 1)))
        assert len(warm) == 0
        broadcast = len(pickle.dumps(need.portable()))
        with tempfile.TemporaryDirectory() as empty:
            cold_need = CacheNeed(FeatureStore(empty, 1), None, 0)
            (cold, _, _), cold_plan, _ = held(
                lambda: features._plan(images, cold_need.plain, cold_need, (0, 1))
            )
        assert len(cold) == n
        tracemalloc.stop()
    out = {
        "listing": listing,
        "listing peak": listing_peak,
        "cache keys": keys,
        "cache keys peak": keys_peak,
        "plan (warm)": plan,
        "plan peak": plan_peak,
        "plan (cold)": cold_plan,
        "broadcast": broadcast,
    }
    return {k: v / n for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--variants", type=int, default=5)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.classes, args.variants)))
        return 0
    print(f"bytes per image held by the driver ({args.classes} classes, {args.variants} distorted variants)")
    for n in args.images:
        start = time.perf_counter()
        argv = [sys.executable, __file__, "--child", str(n), "--classes", str(args.classes)]
        done = subprocess.run(
            [*argv, "--variants", str(args.variants)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        m = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"\n{n:,} images ({time.perf_counter() - start:.0f} s):")
        for name, per_image in m.items():
            print(f"  {name:<16} {per_image:8.1f} B/image")
        held = m["listing"] + m["cache keys"] + max(m["plan (warm)"], m["plan (cold)"])
        peak = max(
            m["listing peak"],
            m["listing"] + m["cache keys peak"],
            m["listing"] + m["cache keys"] + m["plan peak"],
        )
        print(f"  {'held in all':<16} {held:8.1f} B/image (listing, cache keys and the larger plan)")
        print(f"  {'peak':<16} {peak:8.1f} B/image (the largest stage's peak on top of what it keeps)")
        gib = TEN_MILLION / 2**30
        print(
            f"  projection to 10^7 images: {held * gib:.2f} GiB held, {peak * gib:.2f} GiB at the peak; "
            f"broadcast to each Python worker {m['broadcast'] * gib:.2f} GiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
