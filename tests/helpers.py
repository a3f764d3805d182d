"""Helpers shared by the tests: generated image folders, a local HTTP folder server, JPEG bytes, and
the secure-HDFS tests' client identities (lastlayer as a harness user, superuser set-up).

Every test imports them one way, from here (``from helpers import make_dataset``: tests/ is on the
path); conftest.py holds only fixtures and hooks.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lastlayer.engines.base import Engine

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLOWERS = SHARED / "datasets" / "flower_photos_sample"


def shape_image(kind: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A noisy picture of one of three easily told apart things: 'circle', 'square', 'stripes'."""
    base = rng.integers(90, 160, 3)
    arr = np.clip(base + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 30, 30))
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(30, 40, 210))
    else:
        step = int(rng.integers(6, 12))
        for x in range(0, size, 2 * step):
            draw.rectangle([x, 0, x + step - 1, size], fill=(20, 170, 40))
    return img


def make_dataset(root: Path, per_class: int = 30, seed: int = 0, fmt: str = "JPEG") -> Path:
    """Write ``root/<class>/img_<i>.jpg`` for three classes; returns ``root``."""
    rng = np.random.default_rng(seed)
    for folder, kind in (("Red Circles", "circle"), ("blue_squares", "square"), ("green-stripes", "stripes")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            shape_image(kind, rng).save(root / folder / f"img_{i:03d}.{ext}", fmt)
    return root


@contextlib.contextmanager
def serve_http(handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` over HTTP on 127.0.0.1 (a thread per request) while the block runs; yields
    the base URL, ``http://127.0.0.1:PORT``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 while the block runs; yields the base URL."""
    with serve_http(functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))) as url:
        yield url


def retrain_summary(
    images: Path, tmp: Path, model_dir: Path, name: str, steps: int, report: bool = True, **training
) -> dict:
    """Retrain on ``images`` (seed 1, ``steps`` steps, the cache in ``tmp/b``) into ``tmp/name``
    (model ``g.onnx``); the run's summary file as read back."""
    from lastlayer import pipeline
    from lastlayer.settings.run import CacheConfig, OutputConfig, TrainingConfig

    out = tmp / name
    pipeline.retrain(
        str(images),
        training=TrainingConfig(how_many_training_steps=steps, random_seed=1, **training),
        cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(tmp / "b")),
        outputs=OutputConfig(
            output_graph=str(out / "g.onnx"),
            output_labels=str(out / "l.txt"),
            summaries_dir=str(out / "s"),
            report=report,
        ),
    )
    return json.loads((out / "g.summary.json").read_text())


def jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    """``img`` encoded as JPEG."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


class ServeProcess:
    """``lastlayer serve`` in a child process: its stderr lines, and its base URL once it is ready."""

    def __init__(self, argv: list[str], env: dict[str, str] | None, timeout: float) -> None:
        self.timeout = timeout
        self.process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                if "Serving at" in line:
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        assert started.wait(timeout), self.text
        found = re.search(r"Serving at (http://127\.0\.0\.1:\d+)/", self.text)
        assert found is not None, self.text
        self.base = found.group(1)
        self._wait_ready()

    @property
    def text(self) -> str:
        """Everything it wrote to stderr so far."""
        return "".join(self.lines)

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.timeout
        with httpx.Client(timeout=self.timeout) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.base}/v2/health/ready").status_code == 200:
                        return
                assert time.monotonic() < deadline, self.text
                time.sleep(0.1)

    def interrupt(self) -> int:
        """Ctrl-C, as a person stops it; its exit code (killed if it does not stop in time)."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(self.timeout)


@contextlib.contextmanager
def serving(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0
) -> Iterator[ServeProcess]:
    """Run ``argv`` (a ``lastlayer serve`` command) while the block runs; stopped with Ctrl-C after it."""
    server = ServeProcess(argv, env, timeout)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.interrupt()


class FakeEngine(Engine):
    """Base of the tests' engines: made without configuration; subclasses say what ``extract``
    yields."""

    @classmethod
    def from_config(cls, config: object, storage_options: object, spark_conf: object) -> FakeEngine:
        return cls()


# -- the secure-HDFS tests: client identities, lastlayer as a harness user, superuser set-up --------
#: Variables that carry a Kerberos or Hadoop client identity; tests clear them to start from nothing.
ENV_KEYS = ("KRB5CCNAME", "KRB5_CONFIG", "HADOOP_CONF_DIR")


def principal_flags(cluster, user: str) -> list[str]:
    """lastlayer's flags to log in as ``user`` of the harness from its keytab."""
    return [
        f"--principal={cluster.principal(user)}",
        f"--keytab={cluster.keytab(user)}",
        f"--krb5_conf={cluster.krb5_conf}",
        f"--hadoop_conf_dir={cluster.conf_dir}",
    ]


def lastlayer_as(cluster, user: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m lastlayer ARGV`` in a fresh process, logged in as ``user``, no ticket cache prepared."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    return subprocess.run(
        [sys.executable, "-m", "lastlayer", *argv, *principal_flags(cluster, user)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def as_superuser(cluster, code: str) -> None:
    """Run Python ``code`` with an hdfs-native ``fs`` as the `hdfs` superuser, in a fresh process."""
    env = {**os.environ, **cluster.env("hdfs")}
    prologue = (
        f"import fsspec\nfs = fsspec.filesystem('hdfs', host='127.0.0.1', port={cluster.namenode_port})\n"
    )
    subprocess.run([sys.executable, "-c", prologue + code], env=env, check=True, timeout=120)


def upload_for_tensorflow(cluster, photos, folder: str) -> subprocess.CompletedProcess[str]:
    """As the `hdfs` superuser: /tensorflow made and owned by tensorflow, then ``lastlayer upload`` of
    ``photos`` into ``folder`` (asserted to succeed); the upload's process."""
    as_superuser(
        cluster,
        "fs.makedirs('/tensorflow', exist_ok=True)\n"
        "fs.client.set_owner('/tensorflow', 'tensorflow', 'tensorflow')\n",
    )
    done = lastlayer_as(cluster, "hdfs", "upload", str(photos), f"hdfs://{folder}")
    assert done.returncode == 0, done.stderr
    return done
