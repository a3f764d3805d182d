"""The bottleneck cache on a real Kerberized HDFS: files created and load time, beside retrain.py's layout.

    python benchmarks/bench_hdfs.py [--images 1000]

Starts the secure HDFS harness (harness/securehdfs.py: MIT KDC + MiniDFSCluster) in a temporary
folder, then writes the bottlenecks of ``--images`` images (1280 random float32 features each, keyed
as real ones are) twice: as lastlayer's Parquet cache and as retrain.py's one-text-file-per-image
layout, and reads each back. Prints files created per 1,000 images (target <= 2) and the load times.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np

from lastlayer.cache import FeatureStore, Row

ROOT = Path(__file__).resolve().parents[1]
DIM = 1280


def load_harness():
    import importlib.util

    spec = importlib.util.spec_from_file_location("securehdfs", ROOT / "harness" / "securehdfs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["securehdfs"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    n = args.images
    rng = np.random.default_rng(0)
    features = rng.random((n, DIM), dtype=np.float32)
    keys = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(n)]
    securehdfs = load_harness()
    with tempfile.TemporaryDirectory() as tmp, securehdfs.SecureHdfs.start(Path(tmp) / "hdfs") as cluster:
        os.environ.update(cluster.env("hdfs"))
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
        assert len(loaded) == n and np.array_equal(loaded.features[loaded.row(keys[7])], features[7])

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
    ok = parquet_files * 1000 / n <= 2
    print(f"files per 1,000 images: {parquet_files * 1000 / n:.2f} [target <= 2] {'ok' if ok else 'MISSED'}")
    print(f"load time, text layout / Parquet: {text_load / parquet_load:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
