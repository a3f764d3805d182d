"""``lastlayer retrain --engine=spark --spark_master=yarn`` for real: client mode over the Kerberized HDFS,
on the harness's secure MiniYARNCluster, as docs/spark.md describes it.

One YARN run per session (module fixture ``yarn_run``), in which one executor container is killed
mid-extraction, and one local-engine run on the same photos; the tests read what they left: the cache,
the NameNode's audit log, the NodeManagers' container folders."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import ENV_KEYS, as_superuser, lastlayer_as, make_dataset, principal_flags, upload_for_tensorflow

pytestmark = [pytest.mark.yarn, pytest.mark.spark, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
INPUT = "/tensorflow_input_data/yarn_shapes"
BASE = "/tensorflow/spark_yarn"
IMAGES = 90
ARCHIVES_TIMEOUT_S = 600.0
RUN_TIMEOUT_S = 540.0
KILL_WAIT_S = 300.0
START_TIMEOUT_S = 180.0
#: The NameNode's delegation token renew interval on the cluster of the renewal test.
RENEW_S = 15
#: Spark on YARN as docs/spark.md sets it (SPARK_CONF_DIR/spark-defaults.conf), sized for 2 cores.
SPARK_DEFAULTS = """\
spark.yarn.archive hdfs:///apps/spark/spark-jars.zip
spark.archives hdfs:///apps/lastlayer/lastlayer-env.tar.gz#env
spark.executor.instances 2
spark.executor.cores 1
spark.executor.memory 512m
spark.executor.memoryOverhead 700m
spark.yarn.am.memory 384m
spark.task.maxFailures 4
spark.driver.host 127.0.0.1
spark.driver.bindAddress 127.0.0.1
spark.ui.enabled false
"""
EXECUTOR = "org.apache.spark.executor.YarnCoarseGrainedExecutorBackend"


def audit(cluster, path_part: str) -> list[str]:
    """The NameNode's audit lines about paths containing ``path_part``."""
    text = (Path(cluster.root) / "logs" / "harness.log").read_text(errors="replace")
    return [line for line in text.splitlines() if " audit " in line and path_part in line]


def token_reads(cluster) -> set[str]:
    """The input photos opened with a delegation token (by executors)."""
    lines = audit(cluster, f"cmd=open\tsrc={INPUT}/")
    return {re.search(r"src=([^\t]+)", ln).group(1) for ln in lines if "(auth:TOKEN)" in ln}


def executors(local_dirs: Path) -> list[int]:
    """Pids of the Spark executor JVMs running in this harness's containers."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if EXECUTOR in cmdline and str(local_dirs) in cmdline:
            pids.append(int(proc.name))
    return pids


def cache_rows(cluster, folder: str) -> dict[tuple[str, int], list[float]]:
    """Every row of the cache ``folder`` (staging excluded): (content, variant) -> feature, read as
    tensorflow; fails on a duplicate key."""
    code = f"""
import json, fsspec, pyarrow.parquet as pq
fs = fsspec.filesystem('hdfs')
rows = []
for path in fs.find('{folder}'):
    if '/_staging/' in path or not path.endswith('.parquet'):
        continue
    with fs.open(path, 'rb') as f:
        t = pq.read_table(f, columns=['content', 'variant', 'feature']).to_pylist()
    rows += [[r['content'], r['variant'], r['feature']] for r in t]
print(json.dumps(rows))
"""
    env = {**os.environ, **cluster.env("tensorflow")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows: dict[tuple[str, int], list[float]] = {}
    for content, variant, feature in json.loads(done.stdout):
        assert (content, variant) not in rows, f"duplicate row {content} {variant}"
        rows[(content, variant)] = feature
    return rows


def accuracy(stderr: str) -> str:
    found = re.findall(r"Final test accuracy = .*", stderr)
    assert found, stderr[-3000:]
    return found[-1]


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    """The folder of the two archives of scripts/yarn_archives.py, built once."""
    out = tmp_path_factory.mktemp("yarn_archives")
    built = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "yarn_archives.py"), str(out)],
        capture_output=True, text=True, timeout=ARCHIVES_TIMEOUT_S,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def install(cluster, archives: Path, work: Path) -> Path:
    """As the superuser: the archives uploaded to /apps (world-readable: YARN's public cache) and
    tensorflow's home /user/tensorflow (Spark's staging folder); a SPARK_CONF_DIR with
    :data:`SPARK_DEFAULTS`."""
    as_superuser(
        cluster,
        "for d in ('/apps/spark', '/apps/lastlayer', '/user/tensorflow'):\n"
        "    fs.makedirs(d, exist_ok=True)\n"
        "fs.client.set_owner('/user/tensorflow', 'tensorflow', 'tensorflow')\n"
        f"fs.put('{archives}/spark-jars.zip', '/apps/spark/spark-jars.zip')\n"
        f"fs.put('{archives}/lastlayer-env.tar.gz', '/apps/lastlayer/lastlayer-env.tar.gz')\n"
        "for f in ('/apps/spark/spark-jars.zip', '/apps/lastlayer/lastlayer-env.tar.gz'):\n"
        "    fs.client.set_permission(f, 0o644)\n",
    )
    conf = work / "spark-conf"
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text(SPARK_DEFAULTS)
    return conf


def yarn_argv(cluster, base: str, model_dir: Path, summaries: Path) -> list[str]:
    """``lastlayer retrain`` of :data:`INPUT` on YARN as tensorflow (keytab), cache under ``base``."""
    argv = [sys.executable, "-m", "lastlayer", "retrain", *flags(base, model_dir, summaries)]
    return [*argv, *principal_flags(cluster, "tensorflow"), "--engine=spark", "--spark_master=yarn"]


def yarn_env(cluster, spark_conf: Path) -> dict[str, str]:
    """The driver's environment for a yarn master, as docs/spark.md sets it."""
    return {
        **{k: v for k, v in os.environ.items() if k not in ENV_KEYS},
        "HADOOP_CONF_DIR": str(cluster.conf_dir),  # spark-submit wants it for a yarn master
        "SPARK_CONF_DIR": str(spark_conf),
        "PYSPARK_PYTHON": "./env/bin/python",  # the executors' Python, from the packed env
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYTHONPATH": str(ROOT / "src"),
    }


@pytest.fixture(scope="module")
def yarn_app(secure_yarn, archives, tmp_path_factory) -> SimpleNamespace:
    """The archives installed, the photos in place: a SPARK_CONF_DIR."""
    work = tmp_path_factory.mktemp("spark_yarn")
    photos = make_dataset(work / "shapes", per_class=IMAGES // 3, seed=11)
    upload_for_tensorflow(secure_yarn, photos, INPUT)
    return SimpleNamespace(spark_conf=install(secure_yarn, archives, work))


def flags(base: str, model_dir: Path, summaries: Path) -> list[str]:
    return [
        f"--image_dir=hdfs://{INPUT}",
        "--how_many_training_steps=50",
        f"--model_dir={model_dir}",
        f"--bottleneck_dir=hdfs://{base}/bottlenecks",
        f"--output_graph=hdfs://{base}/retrained_graph.onnx",
        f"--output_labels=hdfs://{base}/retrained_labels.txt",
        f"--summaries_dir={summaries}",
        "--random_seed=3",
    ]


def kill_executors_mid_extraction(cluster, run: subprocess.Popen[str]) -> int:
    """Wait until executors have read some but not all photos, then SIGKILL the executor containers'
    JVMs (their Python workers go with them); how many photos had been read then."""
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and run.poll() is None:
        read = len(token_reads(cluster))
        pids = executors(cluster.yarn_local_dirs)
        if 0 < read < IMAGES and pids:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return read
        time.sleep(0.1)
    pytest.fail(f"no executor was reading the photos within {KILL_WAIT_S} s", pytrace=False)


@pytest.fixture(scope="module")
def yarn_run(secure_yarn, yarn_app, model_dir, tmp_path_factory) -> SimpleNamespace:
    """The YARN run (executor containers killed mid-extraction) and the local engine's run."""
    work = tmp_path_factory.mktemp("yarn_run")
    env = yarn_env(secure_yarn, yarn_app.spark_conf)
    argv = yarn_argv(secure_yarn, f"{BASE}/yarn", model_dir, work / "s1")
    before = len(audit(secure_yarn, INPUT))
    started = time.monotonic()
    with (
        (work / "yarn.log").open("w") as log,
        subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True) as run,
    ):
        read_at_kill = kill_executors_mid_extraction(secure_yarn, run)
        try:
            run.wait(timeout=max(1.0, RUN_TIMEOUT_S - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
            pytest.fail(f"the YARN run did not finish in {RUN_TIMEOUT_S} s", pytrace=False)
    stderr = (work / "yarn.log").read_text(errors="replace")
    yarn = SimpleNamespace(
        returncode=run.returncode,
        stderr=stderr,
        read_at_kill=read_at_kill,
        audit=audit(secure_yarn, INPUT)[before:],
    )
    local = lastlayer_as(
        secure_yarn,
        "tensorflow",
        "retrain",
        *flags(f"{BASE}/local", model_dir, work / "s2"),
        timeout=RUN_TIMEOUT_S,
    )
    return SimpleNamespace(yarn=yarn, local=local)


def test_a_run_on_yarn_completes_after_executor_containers_are_killed_mid_extraction(secure_yarn, yarn_run):
    yarn = yarn_run.yarn
    assert yarn.returncode == 0, yarn.stderr[-4000:]
    assert 0 < yarn.read_at_kill < IMAGES
    assert re.search(r"Lost executor|ExecutorLostFailure", yarn.stderr), yarn.stderr[-4000:]
    assert f"Bottlenecks: {IMAGES} computed, 0 from the cache, 0 skipped" in yarn.stderr
    rows = cache_rows(secure_yarn, f"{BASE}/yarn/bottlenecks")  # (fails on a duplicate row)
    assert len(rows) == IMAGES  # none missing


def test_yarn_gives_the_local_engine_s_cache_keys_features_and_accuracy(secure_yarn, yarn_run):
    assert yarn_run.yarn.returncode == 0 and yarn_run.local.returncode == 0, yarn_run.local.stderr[-4000:]
    on_yarn = cache_rows(secure_yarn, f"{BASE}/yarn/bottlenecks")
    local = cache_rows(secure_yarn, f"{BASE}/local/bottlenecks")
    assert set(on_yarn) == set(local)
    for key, feature in local.items():
        np.testing.assert_allclose(on_yarn[key], feature, atol=1e-5)
    assert accuracy(yarn_run.yarn.stderr) == accuracy(yarn_run.local.stderr)


def test_executors_on_yarn_hold_no_keytab_and_work_with_delegation_tokens(secure_yarn, yarn_run):
    assert yarn_run.yarn.returncode == 0, yarn_run.yarn.stderr[-4000:]
    # during the YARN run, the executors read every photo with a token, never with a Kerberos login
    opened = [ln for ln in yarn_run.yarn.audit if f"cmd=open\tsrc={INPUT}/" in ln]
    assert len({re.search(r"src=([^\t]+)", ln).group(1) for ln in opened}) == IMAGES
    assert all("ugi=tensorflow@LOCAL (auth:TOKEN)" in ln for ln in opened)
    # no container was given the keytab: not as a localized file, not by name in its launch script
    keytab = secure_yarn.keytab("tensorflow").read_bytes()
    containers = [p for p in secure_yarn.yarn_local_dirs.rglob("container_*") if p.is_dir()]
    scripts = list(secure_yarn.yarn_local_dirs.rglob("launch_container.sh"))
    assert len(scripts) >= 3, containers  # the application master and at least two executors
    for path in secure_yarn.yarn_local_dirs.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert not path.name.endswith(".keytab"), path
            if path.stat().st_size == len(keytab):
                assert path.read_bytes() != keytab, path
    for script in scripts:
        text = script.read_text(errors="replace")
        assert "keytab" not in text.lower(), script
        assert "HADOOP_TOKEN_FILE_LOCATION" in text, script


def test_a_run_outlasting_the_token_renew_interval_completes_or_names_the_setting(
    securehdfs, archives, model_dir, tmp_path
):
    """On a cluster of its own whose NameNode lets a delegation token lapse after RENEW_S seconds unless
    renewed (the run lasts several times that). The ResourceManager renews the application's token;
    an executor started after Spark refreshed its tokens holds the refreshed one in its container's
    token file, which nobody renews: the run then fails, in one line naming the setting to raise."""
    cluster = securehdfs.SecureHdfs.start(
        tmp_path / "state", timeout=START_TIMEOUT_S, token_renew_ms=RENEW_S * 1000
    )
    try:
        cluster.start_yarn(timeout=START_TIMEOUT_S)
        upload_for_tensorflow(cluster, make_dataset(tmp_path / "shapes", per_class=6, seed=5), INPUT)
        spark_conf = install(cluster, archives, tmp_path)
        argv = yarn_argv(cluster, f"{BASE}/renew", model_dir, tmp_path / "summaries")
        done = subprocess.run(
            argv, env=yarn_env(cluster, spark_conf), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
        renewed = [ln for ln in audit(cluster, "cmd=renewDelegationToken") if "ugi=rm/localhost@LOCAL" in ln]
        assert renewed, done.stderr[-4000:]  # the ResourceManager renews the application's token
        if done.returncode == 0:
            assert "Bottlenecks: 18 computed, 0 from the cache, 0 skipped" in done.stderr
        else:
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith("lastlayer: error: the Spark job failed: "), done.stderr[-4000:]
            assert "its HDFS delegation token has expired" in last
            assert "raise it above the run's length" in last
            assert "dfs.namenode.delegation.token.renew-interval" in last
            assert "Traceback" not in done.stderr.split("lastlayer: error:")[-1]
    finally:
        cluster.stop()
