#!/usr/bin/env python3
"""Build the two archives a Spark-on-YARN run of lastlayer localizes from HDFS (docs/spark.md):

* ``lastlayer-env.tar.gz``: the executors' Python, a packed virtualenv with lastlayer's run-time
  dependencies at the versions of the virtualenv given (``pex3 venv create --venv-repository``
  resolves them from it, offline), packed by ``venv-pack``; lastlayer itself reaches the executors
  from the driver (the Spark engine ships its own package with every application);
* ``spark-jars.zip``: Spark's jars (pyspark's ``jars/``, stored uncompressed), for
  ``spark.yarn.archive``: uploaded once, localized once per NodeManager (public when world-readable),
  instead of ~450 MB uploaded by every application.

    python scripts/yarn_archives.py OUT_DIR [--venv .venv]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: What the executors import: lastlayer's run-time dependencies (pyproject.toml) and the webhdfs extra.
EXECUTOR_REQUIREMENTS = (
    "numpy",
    "pillow",
    "onnx",
    "onnxruntime",
    "pyarrow",
    "fsspec",
    "hdfs-native",
    "regex",
    "requests-kerberos",
)
ENV_ARCHIVE = "lastlayer-env.tar.gz"
JARS_ARCHIVE = "spark-jars.zip"
STEP_TIMEOUT_S = 600


def pack_env(venv: Path, out: Path) -> Path:
    """``out/lastlayer-env.tar.gz`` from the installed distributions of ``venv`` (tools from ``venv``)."""
    target = out / ENV_ARCHIVE
    with tempfile.TemporaryDirectory(prefix="lastlayer-env-") as tmp:
        env_dir = Path(tmp) / "env"
        subprocess.run(
            [str(venv / "bin" / "pex3"), "venv", "create", "-d", str(env_dir),
             f"--venv-repository={venv}", *EXECUTOR_REQUIREMENTS],
            check=True, timeout=STEP_TIMEOUT_S, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        partial = out / f".part-{ENV_ARCHIVE}"
        subprocess.run(
            [str(venv / "bin" / "venv-pack"), "-p", str(env_dir), "-o", str(partial), "--force"],
            check=True, timeout=STEP_TIMEOUT_S, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.replace(partial, target)
    return target


def spark_jars(out: Path) -> Path:
    """``out/spark-jars.zip``: every jar of the installed pyspark, at the archive's root."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    target = out / JARS_ARCHIVE
    partial = out / f".part-{JARS_ARCHIVE}"
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        for jar in sorted(jars.glob("*.jar")):
            archive.write(jar, jar.name)
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder for the two archives")
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix), help="virtualenv to pack (this one)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (pack_env(args.venv, args.out), spark_jars(args.out)):
        print(f"{path} {path.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
