"""Decoding: odd but valid images are read correctly, broken ones raise DataError (never crash)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import jpeg_bytes
from lastlayer.errors import DataError
from lastlayer.preprocess import Distortions, Preprocessing, decode, distort, open_image

PREP = Preprocessing(size=32, central_fraction=0.875, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def red(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, (200, 20, 20)).convert(mode)


def test_plain_jpeg_gives_the_input_shape_and_colour():
    out = decode(jpeg_bytes(red(), quality=95), PREP)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert abs(int(out[..., 0].mean()) - 200) < 6 and out[..., 1].mean() < 30


@pytest.mark.parametrize(
    ("name", "data", "expect_rgb"),
    [
        ("png named .jpg", encode(red(), "PNG"), (200, 20, 20)),
        ("greyscale", encode(Image.new("L", (40, 40), 100), "PNG"), (100, 100, 100)),
        ("cmyk jpeg", jpeg_bytes(red("CMYK"), quality=95), (200, 20, 20)),
        (
            "16-bit greyscale",
            encode(Image.fromarray(np.full((40, 40), 51400, np.uint16)), "PNG"),
            (200, 200, 200),
        ),
        ("alpha over white", encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG"), (255, 255, 255)),
        ("palette", encode(red().convert("P"), "GIF"), (200, 20, 20)),
        ("bmp", encode(red(), "BMP"), (200, 20, 20)),
        ("webp", encode(red(), "WEBP", lossless=True), (200, 20, 20)),
    ],
)
def test_odd_images_decode_to_rgb(name, data, expect_rgb):
    out = decode(data, PREP)
    assert out.shape == (32, 32, 3), name
    assert np.allclose(out.reshape(-1, 3).mean(axis=0), expect_rgb, atol=8), name


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (10, 10, 10))
    img.paste((250, 250, 250), (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = open_image(jpeg_bytes(img, exif=exif, quality=95), PREP)
    assert out.size == (30, 60)
    assert np.asarray(out)[5, 15].mean() > 200  # the white half is now on top


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("zero bytes", b"", "empty"),
        ("garbage", b"this is not an image at all" * 10, "cannot decode"),
        ("truncated", jpeg_bytes(Image.effect_noise((256, 256), 60).convert("RGB"))[:3000], "cannot decode"),
        ("bomb", encode(Image.new("1", (10_000, 10_000)), "PNG"), "decompression bomb"),
    ],
)
def test_broken_images_raise_data_error(name, data, needle):
    with pytest.raises(DataError, match=needle):
        decode(data, PREP)


def test_jpeg_draft_mode_keeps_enough_pixels():
    big = Image.effect_noise((1600, 1200), 40).convert("RGB")
    img = open_image(jpeg_bytes(big), PREP)
    assert min(img.size) >= 32 / 0.875
    assert img.size[0] < 1600  # draft mode reduced it


def test_distort_is_deterministic_per_generator_and_in_range():
    img = Image.effect_noise((80, 60), 60).convert("RGB")
    spec = Distortions(flip_left_right=True, random_crop=10, random_scale=20, random_brightness=30)
    a = distort(img, PREP, spec, np.random.default_rng(3))
    b = distort(img, PREP, spec, np.random.default_rng(3))
    c = distort(img, PREP, spec, np.random.default_rng(4))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_preprocessing_json_round_trip():
    assert Preprocessing.from_json(PREP.to_json()) == PREP
    with pytest.raises(DataError):
        Preprocessing.from_json('{"size": 1}')
