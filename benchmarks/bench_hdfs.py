"""The bottleneck cache and `lastlayer upload` on a real Kerberized HDFS.

    python benchmarks/bench_hdfs.py [--images 1000] [--photos DIR] [--copies 5] [--rounds 3]

Starts the secure HDFS harness (harness/securehdfs.py: MIT KDC + MiniDFSCluster, HDFS's default
settings) in a temporary folder, then:

- writes the bottlenecks of ``--images`` images (1280 random float32 features each, keyed as real ones
  are) twice: as lastlayer's Parquet cache and as retrain.py's one-text-file-per-image layout, and
  reads each back. Prints files created per 1,000 images (target <= 2) and the load times.
- uploads ``--photos`` (default ../shared/datasets/flower_photos_sample) copied ``--copies`` times,
  each copy with distinct bytes (benchmarks/bench.py's repeated_copy: 3,655 photos), with
  ``lastlayer upload``'s defaults, in ``--rounds`` rounds to fresh folders; prints files/s of each
  round (target >= 200 files/s, median of the rounds) and, for scale, the first 400 files with a fixed
  8 files in flight (the old default of ``--threads``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
from bench import DEFAULT_IMAGES, repeated_copy

from lastlayer.bottlenecks.parts import Row
from lastlayer.bottlenecks.store import FeatureStore
from lastlayer.transfer import upload

ROOT = Path(__file__).resolve().parents[1]
DIM = 1280


def load_harness():
    import importlib.util

    spec = importlib.util.spec_from_file_location("securehdfs", ROOT / "harness" / "securehdfs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["securehdfs"] = module
    spec.loader.exec_module(module)
    return module


def cache_benchmark(cluster, n: int) -> None:
    """The Parquet cache against retrain.py's text layout, for ``n`` images."""
    rng = np.random.default_rng(0)
    features = rng.random((n, DIM), dtype=np.float32)
    keys = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(n)]
    fs = fsspec.filesystem("hdfs", host="127.0.0.1", port=cluster.namenode_port)
    base = f"{cluster.namenode_url}/bench"

    start = time.perf_counter()
    store = FeatureStore(f"{base}/parquet", DIM)
    store.add(Row(k, 0, f"c/{i}.jpg", f"1:{i}", features[i], None) for i, k in enumerate(keys))
    store.flush()
    parquet_write = time.perf_counter() - start
    parquet_files = len(fs.find("/bench/parquet"))
    start = time.perf_counter()
    loaded = FeatureStore(f"{base}/parquet", DIM)
    parquet_load = time.perf_counter() - start
    found = loaded.source().rows(np.array([loaded.location(keys[7])]))[0]
    assert len(loaded) == n and np.array_equal(found, features[7])

    start = time.perf_counter()
    fs.makedirs("/bench/text/c", exist_ok=True)
    for i in range(n):
        fs.pipe_file(
            f"/bench/text/c/{i}.jpg_mobilenet_v2.txt", ",".join(f"{v:.9g}" for v in features[i]).encode()
        )
    text_write = time.perf_counter() - start
    text_files = len(fs.find("/bench/text"))
    start = time.perf_counter()
    back = np.stack(
        [
            np.array(fs.cat_file(f"/bench/text/c/{i}.jpg_mobilenet_v2.txt").split(b","), np.float32)
            for i in range(n)
        ]
    )
    text_load = time.perf_counter() - start
    assert np.array_equal(back, features)

    print(
        f"{n} images, {DIM} float32 features each, on a secure MiniDFSCluster (Kerberos, SASL data transfer)"
    )
    print(
        f"lastlayer Parquet cache: {parquet_files} files ({parquet_files * 1000 / n:.2f} per 1,000 images), "
        f"write {parquet_write:.2f} s, load {parquet_load:.2f} s"
    )
    print(
        f"retrain.py text layout: {text_files} files ({text_files * 1000 / n:.0f} per 1,000 images), "
        f"write {text_write:.2f} s, load {text_load:.2f} s"
    )
    allowed = max(1, 2 * n // 1000)  # <= 2 per 1,000 images, and one file is the least any cache writes
    verdict = "ok" if parquet_files <= allowed else "MISSED"
    print(f"files for {n} images: {parquet_files} [target <= 2 per 1,000, here <= {allowed}] {verdict}")
    print(f"load time, text layout / Parquet: {text_load / parquet_load:.1f}x")


def upload_benchmark(cluster, photos: Path, copies: int, rounds: int, work: Path) -> None:
    """``lastlayer upload`` of ``photos`` repeated ``copies`` times, in ``rounds`` rounds."""
    full = repeated_copy(photos, work / "full", copies)
    first = work / "first400"
    for path in sorted(p for p in full.rglob("*") if p.is_file())[:400]:
        (first / path.parent.name).mkdir(parents=True, exist_ok=True)
        (first / path.parent.name / path.name).write_bytes(path.read_bytes())
    base = f"{cluster.namenode_url}/upload"
    rates = []
    for r in range(rounds):
        report = upload(str(full), f"{base}/round{r}")
        rates.append(report.copied / report.seconds)
        print(
            f"upload round {r + 1}: {report.copied} photos ({report.bytes_copied / 2**20:.0f} MiB) in "
            f"{report.seconds:.1f} s = {rates[-1]:.0f} files/s, at most {report.in_flight} files in flight"
        )
    fixed = upload(str(first), f"{base}/fixed8", threads=8)
    print(
        f"upload, 8 files in flight (the old --threads default): {fixed.copied} photos in "
        f"{fixed.seconds:.1f} s = {fixed.copied / fixed.seconds:.0f} files/s"
    )
    rate = statistics.median(rates)
    ok = rate >= 200
    print(
        f"upload files/s (median of {rounds} rounds, range {min(rates):.0f}-{max(rates):.0f}): {rate:.0f} "
        f"[target >= 200] {'ok' if ok else 'MISSED'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--photos", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.photos.is_dir():
        print(f"no photos at {args.photos}: pass --photos DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    securehdfs = load_harness()
    with tempfile.TemporaryDirectory() as tmp, securehdfs.SecureHdfs.start(Path(tmp) / "hdfs") as cluster:
        os.environ.update(cluster.env("hdfs"))
        cache_benchmark(cluster, args.images)
        print()
        upload_benchmark(cluster, args.photos, args.copies, args.rounds, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
