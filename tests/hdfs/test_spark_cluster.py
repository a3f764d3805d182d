"""The Spark engine on a real multi-process cluster over the Kerberized HDFS: a standalone master and
worker on 127.0.0.1, started and stopped here, whose executors (JVMs and Python workers of their own)
read the photos and write the bottleneck cache with an HDFS delegation token, as YARN gives every
container of an application; the driver, logged in from the keytab, commits their files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyspark
import pytest

from helpers import ENV_KEYS, lastlayer_as, make_dataset, principal_flags, upload_for_tensorflow

pytestmark = [pytest.mark.spark, pytest.mark.slow]

SRC = Path(__file__).resolve().parents[2] / "src"
INPUT = "/tensorflow_input_data/cluster_shapes"
BASE = "/tensorflow/spark_cluster"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 420.0
#: An audit line of a rename out of a staging folder (the driver's commit).
COMMIT = re.compile(r"cmd=rename[^\t]*\tsrc=\S*/_staging/\S*\tdst=(?!\S*/_staging/)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_workers(ui_port: int) -> int:
    """Workers the master lists as alive (0 while its web UI does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as answer:
            return int(json.load(answer).get("aliveworkers", 0))
    except (OSError, ValueError):
        return 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group of ``proc``, SIGKILL after :data:`STOP_TIMEOUT_S`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT_S)


def launch(work: Path, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``spark-class ARGV --host 127.0.0.1`` in a session of its own, logging to ``work/NAME.log``."""
    spark_class = str(Path(pyspark.__file__).parent / "bin" / "spark-class")
    with (work / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [spark_class, *argv, "--host", "127.0.0.1"],
            env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def standalone(work: Path, worker_env: dict[str, str]) -> Iterator[str]:
    """A standalone master and one worker of 2 cores on 127.0.0.1 (the worker's executors get
    ``worker_env``); yields the master URL once the worker has registered."""
    port, ui = free_port(), free_port()
    master = ["org.apache.spark.deploy.master.Master", "--port", str(port), "--webui-port", str(ui)]
    worker = ["org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--cores", "2"]
    worker += ["--memory", "3G", "--webui-port", str(free_port()), "--work-dir", str(work / "worker")]
    procs = [launch(work, "master", master, {})]
    try:
        procs.append(launch(work, "worker", worker, worker_env))
        deadline = time.monotonic() + START_TIMEOUT_S
        while alive_workers(ui) < 1:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "\n".join(
                    (work / f"{n}.log").read_text(errors="replace")[-2000:] for n in ("master", "worker")
                )
                pytest.fail(f"the standalone Spark cluster did not start:\n{logs}", pytrace=False)
            time.sleep(0.5)
        yield f"spark://127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            stop(proc)


def delegation_token(cluster, lib: Path, user: str, path: Path) -> None:
    """Fetch an HDFS delegation token of ``user`` into the token file ``path`` with Hadoop's ``fetchdt``
    from the harness's jars ``lib``: what YARN's client does for the containers of an application."""
    env = {**os.environ, **cluster.env(user)}
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
    done = subprocess.run(
        [java, f"-Djava.security.krb5.conf={cluster.krb5_conf}", "-cp", f"{cluster.conf_dir}:{lib}/*",
         "org.apache.hadoop.hdfs.tools.DelegationTokenFetcher", "--renewer", user, str(path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and path.is_file(), done.stderr[-3000:]


def audit(cluster, path_part: str) -> list[str]:
    """The NameNode's audit lines about paths containing ``path_part``."""
    text = (Path(cluster.root) / "logs" / "harness.log").read_text(errors="replace")
    return [line for line in text.splitlines() if " audit " in line and path_part in line]


@pytest.fixture(scope="module")
def cluster_input(secure_hdfs, tmp_path_factory):
    """36 photos in HDFS, readable by tensorflow; /tensorflow owned by tensorflow."""
    photos = make_dataset(tmp_path_factory.mktemp("cluster") / "shapes", per_class=12, seed=7)
    upload_for_tensorflow(secure_hdfs, photos, INPUT)
    return photos


def test_executors_of_a_standalone_cluster_write_the_cache_with_a_delegation_token(
    secure_hdfs, securehdfs, cluster_input, model_dir, tmp_path
):
    tokens = tmp_path / "tokens"
    delegation_token(secure_hdfs, securehdfs.HARNESS_LIB, "tensorflow", tokens)
    python_path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    worker_env = {
        "HADOOP_CONF_DIR": str(secure_hdfs.conf_dir),
        "HADOOP_TOKEN_FILE_LOCATION": str(tokens),
        "KRB5_CONFIG": str(secure_hdfs.krb5_conf),
        "KRB5CCNAME": f"FILE:{tmp_path / 'no-ticket-here'}",  # executors have a token, no ticket
        "PYTHONPATH": python_path,
    }
    flags = [
        f"--image_dir=hdfs://{INPUT}",
        "--how_many_training_steps=20",
        f"--model_dir={model_dir}",
        f"--bottleneck_dir=hdfs://{BASE}/bottlenecks",
        f"--output_graph=hdfs://{BASE}/retrained_graph.onnx",
        f"--output_labels=hdfs://{BASE}/retrained_labels.txt",
        f"--summaries_dir={tmp_path / 'summaries'}",
        "--random_seed=3",
    ]
    driver_env = {
        **{k: v for k, v in os.environ.items() if k not in ENV_KEYS},
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": python_path,
        "PYSPARK_SUBMIT_ARGS": "--conf spark.ui.enabled=false pyspark-shell",
    }
    argv = [sys.executable, "-m", "lastlayer", "retrain", *flags, *principal_flags(secure_hdfs, "tensorflow")]
    with standalone(tmp_path, worker_env) as master:
        argv += ["--engine=spark", f"--spark_master={master}"]
        done = subprocess.run(argv, env=driver_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Bottlenecks: 36 computed, 0 from the cache, 0 skipped" in done.stderr
    assert list((tmp_path / "worker").glob("app-*/*/stderr"))  # executors ran in processes of their own
    # the executors read the photos and wrote the staged parts with the token; the driver, logged in
    # from the keytab, moved them into place
    reads = audit(secure_hdfs, f"cmd=open\tsrc={INPUT}/")
    cache = audit(secure_hdfs, f"{BASE}/bottlenecks/")
    # (the driver's own memo of derived results, <network>/results/, is written with its login)
    staged = [line for line in cache if "cmd=create" in line and "/results/" not in line]
    moved = [line for line in cache if COMMIT.search(line)]
    assert len({re.search(r"src=([^\t]+)", line).group(1) for line in reads}) == 36
    assert all("ugi=tensorflow@LOCAL (auth:TOKEN)" in line for line in reads)
    assert staged and all("ugi=tensorflow@LOCAL (auth:TOKEN)" in line for line in staged)
    assert moved and all("ugi=tensorflow@LOCAL (auth:KERBEROS)" in line for line in moved)
    # the local engine resumes from what the executors wrote
    local = lastlayer_as(secure_hdfs, "tensorflow", "retrain", *flags, timeout=RUN_TIMEOUT_S)
    assert local.returncode == 0, local.stderr[-4000:]
    assert "Bottlenecks: 0 computed, 36 from the cache, 0 skipped" in local.stderr
