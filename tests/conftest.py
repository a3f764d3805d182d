"""Shared fixtures: generated image folders (the suite needs no external data)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

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


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated three-class image folder (30 JPEGs per class)."""
    return make_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole session, so each network is built once."""
    return tmp_path_factory.mktemp("models")


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 while the block runs; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    """``img`` encoded as JPEG."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


_SPARK: dict[str, object] = {}
HDFS_TESTS = Path(__file__).resolve().parent / "hdfs"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark what needs Java: the tests under tests/hdfs (``hdfs``) and those using Spark (``spark``),
    so that ``pytest -m "not hdfs and not spark"`` runs on a machine without Java or a KDC."""
    for item in items:
        if HDFS_TESTS in Path(item.path).parents:
            item.add_marker(pytest.mark.hdfs)
        if "spark_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the tests' Spark session before any test runs, when some test needs it: pyspark launches
    its JVM from a forked child, which must not inherit the threads earlier tests leave (hdfs-native's)."""
    wanted = any("spark_session" in getattr(item, "fixturenames", ()) for item in session.items)
    if not wanted or os.environ.get("LASTLAYER_SKIP_SPARK") == "1":
        return
    from lastlayer.engines import spark

    try:
        _SPARK["session"] = spark.start("local[2,2]")
    except Exception as exc:  # reported by the fixture, in the tests that need Spark
        _SPARK["error"] = exc


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "session" in _SPARK:
        _SPARK.pop("session").stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def spark_session():
    """One Spark session (``local[2,2]``: 2 cores, a failed task tried twice) for the whole test run.

    The Spark tests fail when pyspark or Java is missing (CI must prove the engine works); set
    LASTLAYER_SKIP_SPARK=1 to skip them instead.
    """
    if os.environ.get("LASTLAYER_SKIP_SPARK") == "1":
        pytest.skip("LASTLAYER_SKIP_SPARK=1: Spark engine tests skipped")
    if "error" in _SPARK:
        pytest.fail(f"Spark could not start (set LASTLAYER_SKIP_SPARK=1 to skip): {_SPARK['error']}")
    session = _SPARK["session"]
    session.sparkContext.setLogLevel("ERROR")  # type: ignore[attr-defined]
    return session
