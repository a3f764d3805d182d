"""Class folders for the quality benchmark, built from data sets that packages ship, under /tmp.

    python benchmarks/make_datasets.py fashion-mnist [--per-class 300] [--out /tmp/fashion-mnist]
    python benchmarks/make_datasets.py elpv --wheel elpv_dataset-*.whl [--out /tmp/elpv]

``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (MIT; ``apt-get install dataset-fashion-mnist``),
the first ``--per-class`` training images of each of its 10 classes as 28x28 greyscale PNGs.

``elpv``: the ELPV solar-cell set (2,624 greyscale 300x300 electroluminescence images of 4 defect
probabilities, 57% in the largest class; CC-BY-NC-SA-4.0, for measurement only, never in the repository)
from its PyPI wheel, fetched with ``pip download --no-deps elpv-dataset``; folders ``p000``, ``p033``,
``p067``, ``p100`` by defect probability.

Never writes into the repository: ``--out`` must be outside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FASHION_CLASSES = (
    "t_shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
ELPV_LABELS = "elpv_dataset/data/labels.csv"


def _demo_data_module():
    """scripts/make_demo_data.py, which already reads Debian's IDX files (one reader, not two)."""
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fashion_mnist(source: Path, out: Path, per_class: int) -> int:
    """Write the first ``per_class`` training images of each class; return the number written."""
    demo = _demo_data_module()
    images = demo.read_idx(demo.find_idx(source, "train-images-idx3-ubyte"))
    labels = demo.read_idx(demo.find_idx(source, "train-labels-idx1-ubyte"))
    total = 0
    for label, name in enumerate(FASHION_CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index]).save(folder / f"train_{index:05d}.png")
            total += 1
    return total


def elpv(wheel: Path, out: Path) -> int:
    """Write the ELPV images into one folder per defect probability; return the number written."""
    with zipfile.ZipFile(wheel) as archive:
        rows = archive.read(ELPV_LABELS).decode().split("\n")
        total = 0
        for row in filter(None, (r.split() for r in rows)):
            path, probability = row[0], float(row[1])
            folder = out / f"p{round(probability * 100):03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(path).name).write_bytes(archive.read(f"elpv_dataset/data/{path}"))
            total += 1
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sets = parser.add_subparsers(dest="set", required=True)
    fm = sets.add_parser("fashion-mnist")
    fm.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    fm.add_argument("--per-class", type=int, default=300)
    fm.add_argument("--out", type=Path, default=Path("/tmp/fashion-mnist"))
    ep = sets.add_parser("elpv")
    ep.add_argument("--wheel", type=Path, required=True, help="elpv_dataset-*.whl from pip download")
    ep.add_argument("--out", type=Path, default=Path("/tmp/elpv"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out == REPO or REPO in out.parents:
        print(f"--out {out} is inside the repository: pass a folder outside it", file=sys.stderr)
        return 2
    n = (
        fashion_mnist(args.source, out, args.per_class)
        if args.set == "fashion-mnist"
        else elpv(args.wheel, out)
    )
    print(f"wrote {n} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
