"""int8 versions of the zoo networks (``<name>_int8``): onnxruntime's static quantization, QDQ format.

Weights are int8 per output channel, activations uint8 per tensor, with ranges calibrated on
:data:`CALIBRATION_COUNT` images made here, so no data outside the package is needed: colour noise
with the 1/f spectrum of natural photos, blurred shapes, and bundled demo images. Only ``Conv``,
``Add`` and ``Clip`` are quantized: the uint8 preprocessing prefix, the pooling, the ``features``
output and the ImageNet head stay float32. onnxruntime fuses each DequantizeLinear → Conv →
QuantizeLinear group into an integer convolution when it loads the model.

Why these settings (measured, docs/benchmarks.md "Issue 13"): dynamic quantization turns convolutions
into ``ConvInteger``, about 10x slower than float here and less accurate; percentile calibration keeps
every activation in memory (5.7 GB for EfficientNet-Lite2) for no gain over min/max; 7-bit weights
(``reduce_range``) cost 0.01-0.03 of feature cosine. onnxruntime advises them for x86 CPUs without
VNNI, whose uint8 x int8 kernels can saturate: check the accuracy there with
``benchmarks/bench_int8.py``. The ranges are each tensor's min and max over the calibration images,
except for MobileNetV2 (:data:`MOVING_AVERAGE`), whose extremes are rare outliers: a moving average of
the per-image min and max raised its mean feature cosine to float from 0.975 to 0.99 on the flower
photos and from 0.949 to 0.978 on scikit-image's photos, where it lowered EfficientNet-Lite0's (0.992
to 0.984, 0.977 to 0.972).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from PIL import Image, ImageDraw, ImageFilter

from lastlayer.demo import demo_image_dir
from lastlayer.errors import ModelError
from lastlayer.model.contract import IMAGE
from lastlayer.preprocess import Preprocessing, decode

#: Bumped whenever the settings or the calibration images change; part of every int8 model's key.
VERSION = "2"
#: Calibration images: half 1/f noise, a quarter shapes, a quarter demo images.
CALIBRATION_COUNT = 48
OPS = ("Conv", "Add", "Clip")
#: Network families calibrated with a moving average of the per-image ranges (see the module doc).
MOVING_AVERAGE = frozenset({"mobilenet_v2"})


def pink_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """``uint8 [size, size, 3]``: colour noise whose power falls as 1/f, like a natural photo's,
    with mixed channels, a random mean colour and contrast."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1.0
    amplitude = radius ** -rng.uniform(0.9, 1.1)
    planes = [
        np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((size, size))))) for _ in range(3)
    ]
    x = np.stack(planes, -1) @ (np.eye(3) + 0.3 * rng.normal(size=(3, 3)))
    x = (x - x.mean()) / x.std()
    x = x * rng.uniform(30, 70) + rng.uniform(60, 190, size=3)
    return np.clip(x, 0, 255).astype(np.uint8)


def shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    """``uint8 [size, size, 3]``: 3-11 filled ellipses and rectangles on a plain background, blurred."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, size, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, size, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 3)))), np.uint8)


def calibration_images(prep: Preprocessing, count: int = CALIBRATION_COUNT) -> np.ndarray:
    """``uint8 [count, S, S, 3]`` network inputs, the same on every machine (fixed seed)."""
    rng = np.random.default_rng(0)
    noise = [pink_noise(rng, prep.size) for _ in range(count // 2)]
    drawn = [shapes(rng, prep.size) for _ in range(count // 4)]
    demo = sorted(Path(demo_image_dir()).rglob("*.png"))
    picked = demo[:: max(1, len(demo) // (count - len(noise) - len(drawn)))]
    bundled = [decode(p.read_bytes(), prep) for p in picked[: count - len(noise) - len(drawn)]]
    return np.stack([*noise, *drawn, *bundled])


class _Images(CalibrationDataReader):
    """onnxruntime's calibration data reader over :func:`calibration_images`, one image a call."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = (x[None] for x in images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {IMAGE: batch}


def quantize(model: onnx.ModelProto, prep: Preprocessing, network: str) -> onnx.ModelProto:
    """The int8 version of a float feature network (``image`` → ``features``, ``logits``) of family
    ``network`` (``"mobilenet_v2"``, ...), calibrated on :func:`calibration_images`.

    Raises:
        ModelError: onnxruntime's quantization fails.
    """
    reader = _Images(calibration_images(prep))
    with tempfile.TemporaryDirectory(prefix="lastlayer-int8-") as tmp:
        source, prepared, output = (Path(tmp) / n for n in ("float.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(model, source)
        try:
            quant_pre_process(source, prepared, skip_symbolic_shape=True)  # onnx shape inference is enough
            quantize_static(
                prepared,
                output,
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(OPS),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibMovingAverage": network in MOVING_AVERAGE},
            )
        except Exception as exc:  # onnxruntime raises its own and numpy's types
            raise ModelError(f"onnxruntime could not quantize the network: {exc}") from exc
        return onnx.load(output)
