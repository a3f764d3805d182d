"""The GPU path (``--device cuda``) against the CPU, on a machine with an NVIDIA GPU (issue 13).

    pip install 'lastlayer[gpu]'   # the GPU build of onnxruntime (see the README)
    python benchmarks/bench_gpu.py [--images DIR] [--architecture NAME] [--rounds 3]

On the same images (default ../shared/datasets/flower_photos_sample): images/s of the network alone
(CPU: one single-threaded session per core, batches of 4, as the local engine runs it; GPU: one
session, batches of ``--gpu_batch_size``) and end to end (files to a cold bottleneck cache with the
local engine, ``--device cpu`` against ``--device cuda``), in interleaved rounds; and the largest
difference between the features of every image on the two devices (target <= 1e-3). Exits with 2
and the reason when onnxruntime cannot use a GPU here.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench import missing_images

from lastlayer.bottlenecks.needs import compute_bottlenecks
from lastlayer.dataset import scan
from lastlayer.engines.local import LocalEngine
from lastlayer.model import runtime
from lastlayer.model.contract import FEATURES, IMAGE
from lastlayer.preprocess import decode
from lastlayer.settings.run import EngineConfig
from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "flower_photos_sample"


def cpu_network(model, inputs: np.ndarray) -> tuple[float, np.ndarray]:
    """Images/s and features on the CPU: one single-threaded session per core, batches of 4."""
    cores = os.cpu_count() or 1
    sessions = [model.session(1) for _ in range(cores)]
    out = np.zeros((len(inputs), model.feature_size), np.float32)
    starts = range(0, len(inputs), 4)

    def work(k: int) -> None:
        for i in starts[k::cores]:
            (out[i : i + 4],) = sessions[k].run([FEATURES], {IMAGE: inputs[i : i + 4]})

    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(work, range(cores)))
    return len(inputs) / (time.perf_counter() - start), out


def gpu_network(session, inputs: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Images/s and features on the GPU: one session, batches of ``batch``."""
    session.run([FEATURES], {IMAGE: inputs[:batch]})  # the first run sets up the CUDA kernels
    start = time.perf_counter()
    parts = [session.run([FEATURES], {IMAGE: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)]
    return len(inputs) / (time.perf_counter() - start), np.concatenate(parts)


def end_to_end(images, model, engine, work: Path) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    found = compute_bottlenecks(images, model, str(work), engine)
    seconds = time.perf_counter() - start
    return found.computed / seconds, found.read(np.flatnonzero(found.usable))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--architecture", default=DEFAULT_ARCHITECTURE)
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lastlayer-bench-models"
    )
    parser.add_argument("--gpu_batch_size", type=int, default=EngineConfig().gpu_batch_size)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    problem = runtime.gpu_problem()
    if problem is not None:
        print(f"no GPU for onnxruntime here: {problem}", file=sys.stderr)
        return 2
    if missing_images(args.images):
        return 2
    model = load_feature_model(args.architecture, str(args.model_dir))
    images = scan(str(args.images), 10, 10)
    inputs = np.stack([decode(Path(f.url).read_bytes(), model.preprocessing) for f in images.files])
    session = model.session(0, runtime.CUDA)
    gpu_engine = LocalEngine.from_config(
        EngineConfig(device="cuda", gpu_batch_size=args.gpu_batch_size), None, {}
    )
    print(
        f"{len(inputs)} images, {model.architecture}, {os.cpu_count()} cores, "
        f"onnxruntime providers {session.get_providers()}"
    )
    net, e2e = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # interleaved, so that the machine's drift hits both alike
            cpu_rate, cpu_features = cpu_network(model, inputs)
            gpu_rate, gpu_features = gpu_network(session, inputs, args.gpu_batch_size)
            cpu_e2e, cpu_cached = end_to_end(images, model, LocalEngine(), Path(tmp, f"cpu{r}"))
            gpu_e2e, gpu_cached = end_to_end(images, model, gpu_engine, Path(tmp, f"gpu{r}"))
            net.append(gpu_rate / cpu_rate)
            e2e.append(gpu_e2e / cpu_e2e)
            print(
                f"round {r + 1}: network alone CPU {cpu_rate:.0f} img/s, GPU {gpu_rate:.0f} img/s; "
                f"end-to-end CPU {cpu_e2e:.0f} img/s, GPU {gpu_e2e:.0f} img/s"
            )
    difference = max(
        float(np.abs(gpu_features - cpu_features).max()), float(np.abs(gpu_cached - cpu_cached).max())
    )
    scale = float(np.abs(cpu_features).max())
    print()
    print(f"GPU / CPU, network alone: {statistics.median(net):.1f}x (range {min(net):.1f}-{max(net):.1f})")
    print(f"GPU / CPU, end-to-end: {statistics.median(e2e):.1f}x (range {min(e2e):.1f}-{max(e2e):.1f})")
    ok = difference <= 1e-3
    print(
        f"largest feature difference GPU vs CPU: {difference:.2e} (features up to {scale:.1f}) "
        f"[target <= 1e-3] {'ok' if ok else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
