"""Image preprocessing: the spec that travels with every model, decoding, and distortions.

A network sees ``uint8`` RGB arrays of shape ``[size, size, 3]``: the central ``central_fraction``
of the short side of the image, resized bilinearly to ``size`` x ``size``. Scaling to floats
(``(x - mean) / std`` on the 0..255 scale) happens inside the ONNX graph, so the spec below is all a
reader needs to feed a model exactly as it was trained.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from lastlayer.errors import DataError

#: Images with more pixels than this are refused as decompression bombs (PIL warns above it).
#: Largest image file read, bytes.
MAX_IMAGE_BYTES = 256 << 20
MAX_PIXELS = 89_478_485

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes a network input.

    Attributes:
        size: side of the square input, px.
        central_fraction: fraction of the short side kept by the centre crop (0..1].
        mean: per-channel value subtracted, on the 0..255 scale.
        std: per-channel divisor, on the 0..255 scale.
    """

    size: int
    central_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): stored in model metadata and hashed into cache keys."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        """Parse :meth:`to_json` output."""
        try:
            raw = json.loads(text)
            return cls(
                size=int(raw["size"]),
                central_fraction=float(raw["central_fraction"]),
                mean=(float(raw["mean"][0]), float(raw["mean"][1]), float(raw["mean"][2])),
                std=(float(raw["std"][0]), float(raw["std"][1]), float(raw["std"][2])),
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise DataError(f"invalid preprocessing spec {text!r}: {exc}") from exc


@dataclass(frozen=True)
class Distortions:
    """retrain.py's distortions, in percent (``flip_left_right`` is on/off)."""

    flip_left_right: bool = False
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether any distortion is asked for."""
        return self.flip_left_right or bool(self.random_crop or self.random_scale or self.random_brightness)

    def to_json(self) -> str:
        """Canonical JSON, hashed into the cache key of distorted variants."""
        return json.dumps(asdict(self), sort_keys=True)


NO_DISTORTIONS = Distortions()


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-f]+>")


def open_image(data: bytes, prep: Preprocessing) -> Image.Image:
    """Decode ``data`` into an RGB image at least ``prep.size / central_fraction`` on its short side.

    JPEGs are decoded in draft mode (DCT scaling) when that is enough. EXIF orientation is applied;
    greyscale, CMYK, palette and 16-bit images become 8-bit RGB; alpha is composited onto white.

    Raises:
        DataError: the bytes are empty, not an image, truncated, or a decompression bomb.
    """
    if not data:
        raise DataError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise DataError(
                    f"{img.width}x{img.height} px is over the {MAX_PIXELS} px limit (decompression bomb?)"
                )
            need = math.ceil(prep.size / prep.central_fraction)
            if img.format == "JPEG":
                img.draft("RGB", (need, need))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for untrusted bytes
        text = _OBJECT_REPR.sub("", str(exc))  # the same reason on every run and engine
        raise DataError(f"cannot decode: {exc.__class__.__name__}: {text}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _centre_box(img: Image.Image, fraction: float) -> tuple[float, float, float, float]:
    side = min(img.width, img.height) * fraction
    left = (img.width - side) / 2
    top = (img.height - side) / 2
    return (left, top, left + side, top + side)


def to_input(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The network input for ``img``: ``uint8 [size, size, 3]``."""
    out = img.resize(
        (prep.size, prep.size), Image.Resampling.BILINEAR, box=_centre_box(img, prep.central_fraction)
    )
    return np.asarray(out, dtype=np.uint8)


def decode(data: bytes, prep: Preprocessing) -> np.ndarray:
    """Bytes of an image file to the network input ``uint8 [size, size, 3]``."""
    return to_input(open_image(data, prep), prep)


def distort(img: Image.Image, prep: Preprocessing, spec: Distortions, rng: np.random.Generator) -> np.ndarray:
    """One randomly distorted network input ``uint8 [size, size, 3]``, as retrain.py distorts.

    The centre crop is scaled up by ``(1 + crop%) * uniform(1, 1 + scale%)``, a random
    ``size`` x ``size`` window is cut from it, flipped left-right with probability 1/2 when asked,
    and multiplied by ``uniform(1 - brightness%, 1 + brightness%)``.
    """
    scale = (1.0 + spec.random_crop / 100.0) * rng.uniform(1.0, 1.0 + spec.random_scale / 100.0)
    big = max(prep.size, round(prep.size * scale))
    work = img.resize((big, big), Image.Resampling.BILINEAR, box=_centre_box(img, prep.central_fraction))
    x0 = int(rng.integers(0, big - prep.size + 1))
    y0 = int(rng.integers(0, big - prep.size + 1))
    arr = np.asarray(work, dtype=np.uint8)[y0 : y0 + prep.size, x0 : x0 + prep.size]
    if spec.flip_left_right and rng.random() < 0.5:
        arr = arr[:, ::-1]
    if spec.random_brightness:
        factor = rng.uniform(1.0 - spec.random_brightness / 100.0, 1.0 + spec.random_brightness / 100.0)
        arr = np.clip(arr.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)
