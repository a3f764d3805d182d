"""A small demo image set shipped with lastlayer (a Fashion-MNIST subset; see ``LICENSE.txt``).

``lastlayer retrain`` uses it when no ``--image_dir`` is given: five classes (``t_shirt_top``,
``trouser``, ``sneaker``, ``bag``, ``ankle_boot``), 40 greyscale 28x28 PNGs each, one sub-folder
per class. ``scripts/make_demo_data.py`` rebuilds it from Debian's ``dataset-fashion-mnist``.
"""

from pathlib import Path

__all__ = ["demo_image_dir"]


def demo_image_dir() -> str:
    """Local path of the demo ``images`` folder (one sub-folder of PNGs per class)."""
    return str(Path(__file__).resolve().parent / "images")
