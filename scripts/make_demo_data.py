"""Build the demo image set shipped in ``src/lastlayer/demo`` from Debian's Fashion-MNIST.

Needs the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
which installs the IDX files under ``/usr/share/datasets/fashion-mnist``, the MIT (Expat) licence
text in ``/usr/share/doc/dataset-fashion-mnist/copyright`` and upstream's README (whose licence
section holds the upstream copyright notice) next to it.

Writes ``images/<class folder>/train_<index>.png`` for five visually distinct classes, the first
``--per-class`` images of each class in the training set (``<index>`` is the image's position
there), as 8-bit greyscale 28x28 PNGs, plus ``LICENSE.txt``. Re-running gives the same images.

Usage: ``python scripts/make_demo_data.py [--source DIR] [--copyright FILE] [--readme FILE] [--out DIR]``
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_COPYRIGHT = Path("/usr/share/doc/dataset-fashion-mnist/copyright")
DEFAULT_README = Path("/usr/share/doc/dataset-fashion-mnist/README.md.gz")
DEFAULT_OUT = REPO / "src" / "lastlayer" / "demo"

# Fashion-MNIST label -> folder name; the classes least alike to the eye.
CLASSES = {0: "t_shirt_top", 1: "trouser", 7: "sneaker", 8: "bag", 9: "ankle_boot"}

IDX_DTYPES = {0x08: np.uint8}

ATTRIBUTION = (
    "These images are a small subset of Fashion-MNIST by Zalando Research (Han Xiao, Kashif Rasul and "
    'Roland Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning '
    'Algorithms", arXiv:1708.07747, 2017; https://github.com/zalandoresearch/fashion-mnist), taken '
    "from the Debian package dataset-fashion-mnist. They are the first {per_class} images of each of "
    "five classes in the Fashion-MNIST training set ({classes}), in the training set's order, saved "
    "unchanged as 8-bit greyscale 28x28 PNG files named train_<index>.png after their position in "
    "that set, by scripts/make_demo_data.py in the lastlayer source tree. Fashion-MNIST is distributed "
    "under the MIT (Expat) licence, reproduced below."
)

LICENSE_FILE = """\
Demo images for `lastlayer retrain` (used when no --image_dir is given)
=======================================================================

{attribution}

-----------------------------------------------------------------------

{notice}

{licence}
"""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of its declared shape."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in IDX_DTYPES:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file has {data.size} values")
    return data.reshape(shape)


def find_idx(source: Path, stem: str) -> Path:
    """``<stem>`` or ``<stem>.gz`` in ``source``."""
    for candidate in (source / stem, source / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"neither {stem} nor {stem}.gz in {source}")


def read_expat_licence(copyright_file: Path) -> str:
    """The Expat licence text of a Debian copyright file (its stand-alone licence paragraph)."""
    for stanza in copyright_file.read_text(encoding="utf-8").split("\n\n"):
        lines = stanza.strip("\n").splitlines()
        if lines and lines[0] == "License: Expat":
            body = [line[1:].rstrip() for line in lines[1:]]
            return "\n".join("" if line == "." else line for line in body)
    raise ValueError(f"no Expat licence paragraph in {copyright_file}")


def read_upstream_notice(readme: Path) -> str:
    """The first paragraph of the ``## License`` section of upstream's README (gzipped or not)."""
    raw = readme.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    _, found, section = text.partition("\n## License\n")
    notice = section.strip().split("\n\n", 1)[0].strip()
    if not found or "Copyright" not in notice:
        raise ValueError(f"no copyright notice in the License section of {readme}")
    return notice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of the IDX files")
    parser.add_argument("--copyright", type=Path, default=DEFAULT_COPYRIGHT, help="Debian copyright file")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README, help="upstream README")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the demo folder to (re)write")
    parser.add_argument("--per-class", type=int, default=40, help="images per class")
    args = parser.parse_args(argv)

    images = read_idx(find_idx(args.source, "train-images-idx3-ubyte"))
    labels = read_idx(find_idx(args.source, "train-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"unexpected shapes: images {images.shape}, labels {labels.shape}")

    image_root = args.out / "images"
    total = 0
    for label, folder in CLASSES.items():
        target = image_root / folder
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.png"):
            stale.unlink()
        indices = np.flatnonzero(labels == label)[: args.per_class]
        if len(indices) < args.per_class:
            raise ValueError(f"class {label} has only {len(indices)} training images")
        for index in indices:
            Image.fromarray(images[index]).save(target / f"train_{index:05d}.png", optimize=True)
        total += len(indices)

    licence = read_expat_licence(args.copyright)
    notice = read_upstream_notice(args.readme)
    attribution = ATTRIBUTION.format(
        per_class=args.per_class,
        classes=", ".join(f"{name} = label {label}" for label, name in CLASSES.items()),
    )
    (args.out / "LICENSE.txt").write_text(
        LICENSE_FILE.format(attribution=textwrap.fill(attribution, 100), notice=notice, licence=licence),
        encoding="utf-8",
    )
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file() and p.suffix in (".png", ".txt"))
    print(f"wrote {total} images and LICENSE.txt to {args.out} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
