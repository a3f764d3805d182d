"""lastlayer's own code on a cluster's executors: the driver ships its package with the application.

On a cluster (YARN, Kubernetes, a standalone master) the executors' Python comes from elsewhere (a
packed virtualenv in ``spark.archives``, an image), and the lastlayer there, if any, need not be the
driver's: an editable install points at a source folder of the driver's machine, and a different
version could compute different features. So the driver zips the Python modules of the ``lastlayer``
package it runs (not its demo images or templates, which executors never read) and adds the zip
with ``SparkContext.addPyFile``: Spark puts it first on the executors' ``sys.path``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

ZIP_NAME = "lastlayer-driver.zip"


def package_zip(folder: Path) -> Path:
    """``folder/lastlayer-driver.zip``: every ``.py`` file of the running ``lastlayer`` package, under
    ``lastlayer/``; its path."""
    root = Path(__file__).resolve().parents[1]  # this module is lastlayer/engines/shipping.py
    target = folder / ZIP_NAME
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                archive.write(path, Path("lastlayer") / path.relative_to(root))
    return target


def ship(spark: SparkSession) -> None:
    """Add the driver's lastlayer to the application (a zip in the driver's Spark temporary folder,
    removed with the session); nothing on a local master, whose executors are this process's Python."""
    from pyspark import SparkFiles

    sc = spark.sparkContext
    if sc.master.startswith("local"):
        return
    folder = Path(SparkFiles.getRootDirectory()).parent
    sc.addPyFile(str(package_zip(folder)))
