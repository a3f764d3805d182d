"""Helpers shared by the tests: generated image folders, a local HTTP folder server, JPEG bytes.

Tests import them from here (``from helpers import make_dataset``); conftest.py holds only fixtures
and hooks.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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
