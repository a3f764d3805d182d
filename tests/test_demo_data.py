"""The demo image set shipped in lastlayer.demo."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lastlayer.demo import demo_image_dir

CLASSES = ["ankle_boot", "bag", "sneaker", "t_shirt_top", "trouser"]


def test_demo_has_five_classes_of_forty_pngs() -> None:
    root = Path(demo_image_dir())
    assert root.is_dir()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == CLASSES
    for name in CLASSES:
        assert len(list((root / name).glob("*.png"))) == 40, name
    assert not [p for p in root.rglob("*") if p.is_file() and p.suffix != ".png"]


def test_demo_images_are_valid_28x28_greyscale() -> None:
    for path in Path(demo_image_dir()).rglob("*.png"):
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (28, 28), path
            assert image.mode == "L", path
            image.load()


def test_demo_licence_exists() -> None:
    licence = Path(demo_image_dir()).parent / "LICENSE.txt"
    text = licence.read_text(encoding="utf-8")
    assert "Zalando" in text
    assert "Permission is hereby granted" in text
