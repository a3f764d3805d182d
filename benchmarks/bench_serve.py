"""Load test of `lastlayer serve` on 127.0.0.1: throughput and latency at 1, 4 and 16 clients.

    python benchmarks/bench_serve.py [--graph MODEL] [--images DIR] [--requests N] [--seconds S]
                                     [--rounds R] [--max_wait_ms MS] [--max_batch B] [--compare_src DIR]

Starts `lastlayer serve` in a child process on 127.0.0.1 (a free port), then for each number of
concurrent clients (keep-alive connections of one asyncio loop in this process, each request
encoded beforehand, so that the load generator costs little CPU: it prints its own) posts JPEG
files to /v1/models/NAME:classify, at most ``--requests`` requests or ``--seconds`` seconds per
level, whichever ends first. Prints images/s, p50 and p99 latency and the mean batch size the
server formed, next to two bounds measured in this process on the same images and model:

- network alone: onnxruntime on already prepared inputs, best batch size (what no server can beat);
- decode + network: 1 / (1/decode + 1/network), decoding measured alone on the same files;
- one image alone: decoding one file, then the network on it alone (the floor of a lone request's
  latency, with the HTTP floor added).

and the HTTP floor: the round trip of GET /v2/health/live with one client. Without --graph, a model
is first trained on the images (50 steps). With ``--compare_src DIR`` a second server runs lastlayer
from the sources in DIR (for example main's, unpacked by ``git archive main src``) and the two take
turns at each level, so that before and after are measured side by side. Default images:
../shared/datasets/flower_photos_sample, else the bundled demo set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx

import lastlayer
from lastlayer.demo import demo_image_dir
from lastlayer.model.inference import RetrainedModel
from lastlayer.settings.run import CacheConfig, OutputConfig, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "flower_photos_sample"
CLIENTS = (1, 4, 16)
MAX_FILES = 64
START_S = 120
#: Throughput at the most clients over the network alone that the server should reach.
TARGET = 0.8


def image_files(folder: Path) -> list[bytes]:
    """At most MAX_FILES image files of ``folder`` (any depth), in a fixed order."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(paths) // MAX_FILES)
    return [p.read_bytes() for p in paths[::step][:MAX_FILES]]


def train(images: Path, work: Path) -> Path:
    graph = work / "bench.onnx"
    lastlayer.retrain(
        str(images),
        training=TrainingConfig(how_many_training_steps=50, random_seed=1),
        cache=CacheConfig(bottleneck_dir=str(work / "bottlenecks")),
        outputs=OutputConfig(
            output_graph=str(graph),
            output_labels=str(work / "labels.txt"),
            summaries_dir=str(work / "summaries"),
            report=False,
        ),
    )
    return graph


def rate_of(work, n: int, rounds: int = 3) -> float:
    """Items/s of ``work()`` (which handles ``n`` items), best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return n / best


def bounds(graph: Path, files: list[bytes]) -> dict[str, float]:
    """Network alone (best batch, threads spin-waiting between calls or not, as onnxruntime does by
    default and as the server does) and decode + network, images/s, in this process."""
    rates: dict[tuple[int, bool], float] = {}
    for spin in (True, False):
        model = RetrainedModel.load(str(graph), spin=spin)
        inputs = [model.prepare(f) for f in files]
        for batch in (1, 4, 8, 16, 32):
            chunks = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
            model.probabilities(chunks[0])  # warm
            rates[batch, spin] = rate_of(partial(_run_all, model, chunks), len(inputs))
    network = max(rates.values())
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        decode = rate_of(lambda: list(pool.map(model.prepare, files)), len(files))
    alone = rate_of(lambda: [model.prepare(f) for f in files], len(files))
    one = 1000 / max(rates[1, True], rates[1, False]) + 1000 / alone
    return {"network": network, "decode": decode, "limit": 1 / (1 / decode + 1 / network), "one_ms": one}


def _run_all(model: RetrainedModel, chunks: list[list]) -> None:
    for chunk in chunks:
        model.probabilities(chunk)


@contextlib.contextmanager
def server(graph: Path, extra: list[str], src: str | None = None) -> Iterator[str]:
    """`lastlayer serve` in a child process on 127.0.0.1 (lastlayer from ``src`` when given, else
    this process's); yields its base URL."""
    argv = [sys.executable, "-m", "lastlayer", "serve", f"--graph=bench={graph}", "--port=0", *extra]
    env = {**os.environ, "PYTHONPATH": src} if src else None
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:  # type: ignore[union-attr]
            if match := re.search(r"Serving at (http://127\.0\.0\.1:\d+)/", line):
                found.append(match.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(START_S):
            raise SystemExit(f"the server did not start within {START_S} s")
        base = found[0]
        deadline = time.monotonic() + START_S
        with httpx.Client(timeout=10) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{base}/v2/health/ready").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not become ready")
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def request(base: str, path: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 POST of ``body`` to ``base`` + ``path``, encoded once (keep-alive)."""
    host = base.removeprefix("http://")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    base: str, requests: list[bytes], turns: Iterator[int], deadline: float, took: list[float]
) -> int:
    """One keep-alive connection sending ``requests`` in turn (the next of ``turns`` each time) until
    ``turns`` ends or ``deadline`` (monotonic) passes; appends each 200's seconds to ``took`` and
    returns the number of other replies."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    errors = 0
    try:
        for i in turns:
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            if head.startswith(b"HTTP/1.1 200"):
                took.append(time.perf_counter() - start)
            else:
                errors += 1
    finally:
        writer.close()
    return errors


async def _clients(
    base: str, requests: list[bytes], clients: int, count: int, seconds: float, took: list[float]
) -> int:
    turns = iter(range(count))  # shared: one event loop, so no lock
    deadline = time.monotonic() + seconds
    tasks = [_client(base, requests[k:] + requests[:k], turns, deadline, took) for k in range(clients)]
    return sum(await asyncio.gather(*tasks))


def load(base: str, files: list[bytes], clients: int, requests: int, seconds: float) -> dict[str, float]:
    """``clients`` keep-alive connections of one asyncio loop in this process posting ``files`` in
    turn (requests encoded beforehand) until ``requests`` are done or ``seconds`` pass; ``client_cpu``
    is this process's CPU seconds per wall second meanwhile (the load generator's own cost)."""
    encoded = [request(base, "/v1/models/bench:classify", f) for f in files]
    latencies: list[float] = []
    with httpx.Client(timeout=10) as http:
        before = http.get(f"{base}/v2/models/bench/stats").json()["model_stats"][0]
    start, cpu = time.perf_counter(), time.process_time()
    errors = asyncio.run(_clients(base, encoded, clients, requests, seconds, latencies))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    with httpx.Client(timeout=10) as http:
        after = http.get(f"{base}/v2/models/bench/stats").json()["model_stats"][0]
    images = after["inference_count"] - before["inference_count"]
    batches = max(after["execution_count"] - before["execution_count"], 1)
    latencies.sort()
    return {
        "n": len(latencies),
        "errors": errors,
        "rate": len(latencies) / wall,
        "p50": 1000 * latencies[len(latencies) // 2],
        "p99": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "batch": images / batches,
        "client_cpu": cpu / wall,
    }


def http_floor(base: str, n: int = 200) -> float:
    """Median ms of GET /v2/health/live, one client."""
    times = []
    with httpx.Client(timeout=10) as http:
        for _ in range(n):
            start = time.perf_counter()
            http.get(f"{base}/v2/health/live")
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--graph", type=Path, help="a retrained model (default: train one on the images)")
    parser.add_argument("--images", type=Path, help="a folder of images (any depth)")
    parser.add_argument("--requests", type=int, default=300, help="most requests per level and round")
    parser.add_argument("--seconds", type=float, default=30.0, help="most seconds per level and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the client levels")
    parser.add_argument("--max_wait_ms", type=float, help="passed to lastlayer serve")
    parser.add_argument("--max_batch", type=int, help="passed to lastlayer serve")
    parser.add_argument(
        "--compare_src",
        help="also serve from this source tree (the src folder of another checkout) and measure both "
        "side by side, taking turns",
    )
    args = parser.parse_args()
    folder = args.images or (DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else Path(demo_image_dir()))
    files = image_files(folder)
    extra = [f"--{k}={v}" for k in ("max_wait_ms", "max_batch") if (v := getattr(args, k)) is not None]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"images: {len(files)} files from {folder}; server flags: {' '.join(extra) or 'defaults'}")
    with tempfile.TemporaryDirectory() as work:
        graph = args.graph or train(folder, Path(work))
        limits = bounds(graph, files)
        print(
            f"network alone {limits['network']:.1f} img/s; decode alone {limits['decode']:.1f} img/s; "
            f"decode + network limit {limits['limit']:.1f} img/s; one image alone (decode, then the "
            f"network at batch 1) {limits['one_ms']:.1f} ms"
        )
        sources = {
            "this checkout": None,
            **({f"--compare_src={args.compare_src}": args.compare_src} if args.compare_src else {}),
        }
        results = {name: {c: [] for c in CLIENTS} for name in sources}
        with contextlib.ExitStack() as stack:
            bases = {name: stack.enter_context(server(graph, extra, src)) for name, src in sources.items()}
            for name, base in bases.items():
                print(f"{name}: HTTP floor (GET /v2/health/live, 1 client): {http_floor(base):.2f} ms")
                load(base, files, 4, 40, 30)  # warm the server's threads and sessions
            for r in range(args.rounds):  # the servers take turns, so that the machine's drift hits both
                for clients in CLIENTS:
                    for name, base in bases.items():
                        m = load(base, files, clients, args.requests, args.seconds)
                        results[name][clients].append(m)
                        print(
                            f"round {r + 1}, {name}, {clients:2d} clients: {m['rate']:6.1f} img/s, "
                            f"p50 {m['p50']:6.1f} ms, p99 {m['p99']:6.1f} ms, mean batch {m['batch']:4.1f}, "
                            f"n={m['n']}, errors={m['errors']}, load generator CPU {m['client_cpu']:.2f} core"
                        )
        for name in sources:
            summarize(name, results[name], limits)


def summarize(name: str, results: dict[int, list[dict[str, float]]], limits: dict[str, float]) -> None:
    """The medians over rounds of one server, and its ratio at the most clients against the target."""
    print(f"\n{name}: median over rounds (throughput / network alone, / decode + network limit):")
    for clients in CLIENTS:
        rates = [m["rate"] for m in results[clients]]
        rate = statistics.median(rates)
        print(
            f"{clients:2d} clients: {rate:6.1f} img/s (rounds {min(rates):.1f}-{max(rates):.1f}), "
            f"p50 {statistics.median(m['p50'] for m in results[clients]):6.1f} ms, "
            f"p99 {statistics.median(m['p99'] for m in results[clients]):6.1f} ms; "
            f"{rate / limits['network']:.2f} of network alone, {rate / limits['limit']:.2f} of the limit"
        )
    top = statistics.median(m["rate"] for m in results[CLIENTS[-1]]) / limits["network"]
    verdict = "ok" if top >= TARGET else "MISSED"
    print(f"{name}: {CLIENTS[-1]} clients / network alone: {top:.2f}  [target >= {TARGET}] {verdict}")


if __name__ == "__main__":
    main()
