"""The Spark engine on ``local[2,2]``: same features and model as the local engine, one shared cache
written by the executors, retries without duplicate rows, resuming after a failed job, and clear
refusals."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import make_dataset
from lastlayer.bottlenecks.keys import CachedKeys
from lastlayer.bottlenecks.needs import CacheNeed, compute_bottlenecks
from lastlayer.bottlenecks.staging import CacheFolders
from lastlayer.bottlenecks.store import FeatureStore
from lastlayer.cli import main
from lastlayer.dataset import scan
from lastlayer.engines import executor, jvm, spark
from lastlayer.engines.base import Task, available_cores
from lastlayer.engines.local import LocalEngine
from lastlayer.errors import EngineError, UsageError
from lastlayer.preprocess import Distortions
from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

DISTORT = Distortions(flip_left_right=True, random_crop=10, random_scale=10, random_brightness=10)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_feature_model(DEFAULT_ARCHITECTURE, str(model_dir))


@pytest.fixture
def engines(spark_session):
    """Both engines, by name; the Spark one runs on the tests' session."""
    with spark.SparkEngine() as remote:
        yield {"local": LocalEngine(), "spark": remote}


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory) -> Path:
    """Three classes, plus files that cannot be decoded and names Spark treats specially."""
    data = make_dataset(tmp_path_factory.mktemp("odd") / "data", per_class=8)
    good = (data / "blue_squares" / "img_000.jpg").read_bytes()
    (data / "Red Circles" / "zero.jpg").write_bytes(b"")
    (data / "blue_squares" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (data / "blue_squares" / "garbage.png").write_bytes(b"\x89PNG not really")
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(buf, "PNG")
    (data / "Red Circles" / "_hidden to spark.png").write_bytes(buf.getvalue())
    (data / "green-stripes" / "glob [1] {a,b} * ? %20 #.jpg").write_bytes(good)
    (data / "green-stripes" / "sub").mkdir()
    (data / "green-stripes" / "sub" / "copy.jpg").write_bytes(good)  # same bytes: one content key
    return data


def parquet_rows(folder: Path) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    for part in folder.glob("part-*.parquet"):
        table = pq.read_table(part)
        keys += zip(table.column("content").to_pylist(), table.column("variant").to_pylist(), strict=True)
    return keys


def test_features_and_skipped_images_equal_the_local_engine_s(engines, odd_dir, model, tmp_path):
    images = scan(str(odd_dir), 10, 10)
    both = {
        name: compute_bottlenecks(
            images, model, str(tmp_path / name), engine, distortions=DISTORT, variants=2
        )
        for name, engine in engines.items()
    }
    local, remote = both["local"], both["spark"]
    assert remote.skipped == local.skipped and len(local.skipped) == 3
    # the executors see the cache as it was, so the two copies of one image are both computed there
    assert remote.computed == local.computed + 2 and remote.computed + remote.reused == 27
    assert np.array_equal(remote.usable, local.usable) and np.array_equal(remote.plain >= 0, local.plain >= 0)
    used = np.flatnonzero(local.plain[:, 0] >= 0)  # (validation and test: training images have variants)
    assert np.abs(remote.read(used) - local.read(used)).max() <= 1e-5
    assert np.array_equal(remote.variant_images, local.variant_images)
    assert len(np.unique(local.variant_images)) > 10
    variants = len(images.files) + np.arange(len(local.variant_images))
    assert np.abs(remote.read(variants) - local.read(variants)).max() <= 1e-5


def retrain_argv(tmp: Path, image_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    out = tmp / "out"
    return [
        "retrain",
        f"--image_dir={image_dir}",
        "--how_many_training_steps=40",
        f"--model_dir={model_dir}",
        f"--bottleneck_dir={tmp / 'bottlenecks'}",
        f"--output_graph={out / 'graph.onnx'}",
        f"--output_labels={out / 'labels.txt'}",
        f"--summaries_dir={out / 'summaries'}",
        "--random_seed=11",
        *extra,
    ]


def test_the_model_is_identical_given_the_seed(spark_session, shapes_dir, model_dir, tmp_path):
    assert main(retrain_argv(tmp_path / "local", shapes_dir, model_dir)) == 0
    assert main(retrain_argv(tmp_path / "spark", shapes_dir, model_dir, "--engine=spark")) == 0
    local = (tmp_path / "local" / "out" / "graph.onnx").read_bytes()
    assert (tmp_path / "spark" / "out" / "graph.onnx").read_bytes() == local
    summary = json.loads((tmp_path / "spark" / "out" / "graph.summary.json").read_text())
    assert summary["options"]["engine"] == "spark" and summary["cache"]["computed"] == 90
    local_summary = json.loads((tmp_path / "local" / "out" / "graph.summary.json").read_text())
    assert summary["trust"] == local_summary["trust"] and summary["trust"]["unknown"] is not None


def test_one_engine_resumes_from_the_other_s_cache(engines, model, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    images = scan(str(data), 10, 10)
    cache = str(tmp_path / "cache")
    half = compute_bottlenecks(images, model, cache, engines["local"], shard=(0, 2))  # about half
    assert 0 < half.computed < 18
    rest = compute_bottlenecks(images, model, cache, engines["spark"])
    assert rest.computed == 18 - half.computed and rest.reused == half.computed
    again = compute_bottlenecks(images, model, cache, engines["local"])
    assert again.computed == 0 and again.reused == 18
    assert np.array_equal(again.read(np.arange(18)), rest.read(np.arange(18)))


def test_a_damaged_file_the_executors_wrote_is_detected_and_recomputed(engines, model, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=45)
    images = scan(str(data), 10, 10)
    cache = str(tmp_path / "cache")
    assert compute_bottlenecks(images, model, cache, engines["spark"]).computed == 135
    (root,) = (tmp_path / "cache").iterdir()
    files = sorted(root.glob("part-*.parquet"))
    assert len(files) >= 2  # one per task
    lost = pq.read_metadata(files[0]).num_rows
    damaged = bytearray(files[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    files[0].write_bytes(bytes(damaged))
    again = compute_bottlenecks(images, model, cache, engines["local"])
    assert again.damaged_files == 1 and again.computed == lost and again.reused == 135 - lost


def failing_first_attempt(real, marker: Path):
    """``executor.extract`` that, on each partition's first attempt, takes its images in reverse order (so its
    part files differ from the retry's), writes them, records their names and dies."""

    def flaky(tasks, **kwargs):
        from pyspark import TaskContext

        context = TaskContext.get()
        if context.attemptNumber() > 0:
            yield from real(tasks, **kwargs)
            return
        for outcome in real(list(tasks)[::-1], **kwargs):
            if outcome.part is not None:
                marker.joinpath(outcome.part).write_text(str(context.partitionId()))
        raise RuntimeError("executor lost after writing its part files (test)")

    return flaky


def test_a_retried_task_adds_no_duplicate_rows(engines, model, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=12)
    marker = tmp_path / "markers"
    marker.mkdir()
    monkeypatch.setattr(executor, "extract", failing_first_attempt(executor.extract, marker))
    images = scan(str(data), 10, 10)
    b = compute_bottlenecks(
        images, model, str(tmp_path / "cache"), engines["spark"], distortions=DISTORT, variants=2
    )
    failed = {p.name for p in marker.iterdir()}
    assert len(failed) >= 2  # first attempts did write, and were retried
    assert b.computed == 36 and not b.skipped
    (root,) = (tmp_path / "cache").iterdir()
    plain = parquet_rows(root)
    (dist,) = root.glob("distorted-*")
    variants = parquet_rows(dist)
    assert len(plain) == len(set(plain)) == 36
    assert (
        len(variants) == len(set(variants)) == len(b.variant_images) == 2 * len(np.unique(b.variant_images))
    )
    written = {p.name for folder in (root, dist) for p in folder.iterdir()}
    assert not failed & written  # the failed attempts' files never reached the cache
    assert not list(root.rglob("_staging/*")) and not list(dist.rglob("_staging/*"))


def test_a_failed_job_keeps_its_finished_waves_and_a_rerun_resumes(engines, model, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=12)
    images = scan(str(data), 10, 10)
    monkeypatch.setattr(spark, "WAVE_MIN", 12)
    monkeypatch.setattr(spark, "WAVE_PER_CORE", 1)
    real = executor.extract

    def broken_after_the_first_wave(tasks, **kwargs):
        for outcome in real(tasks, **kwargs):
            if outcome.index >= 12:
                raise OSError("disk full (test)")
            yield outcome

    monkeypatch.setattr(executor, "extract", broken_after_the_first_wave)
    with pytest.raises(EngineError, match="disk full"):
        compute_bottlenecks(images, model, str(tmp_path / "cache"), engines["spark"])
    monkeypatch.setattr(executor, "extract", real)
    rerun = compute_bottlenecks(images, model, str(tmp_path / "cache"), engines["spark"])
    assert rerun.reused == 12 and rerun.computed == 24


def test_a_file_that_vanished_after_the_scan_is_skipped(engines, model, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    tasks = [Task(0, str(data / "gone.jpg"), "x/gone.jpg", None, False)]
    tasks += [Task(1, str(data / "blue_squares" / "img_000.jpg"), "blue_squares/img_000.jpg", None, False)]
    need = CacheNeed(CachedKeys.empty(), None, 0)
    folders = CacheFolders(str(tmp_path / "cache"), None, model.feature_size)
    results = list(engines["spark"].extract(tasks, model, need, Distortions(), cache=folders))
    by_index = {r.task.index: r for r in results}
    assert by_index[0].error == "file vanished while the run was reading it"
    assert by_index[1].stored == 1 and by_index[1].plain is None  # in the cache, not sent back
    store = FeatureStore(str(tmp_path / "cache"), model.feature_size)
    assert len(store) == 1 and store.has(by_index[1].content)


def test_without_pyspark_the_engine_is_a_one_line_usage_error(monkeypatch, capsys, tmp_path, shapes_dir):
    monkeypatch.setattr(spark, "available", lambda: False)
    code = main(
        ["retrain", f"--image_dir={shapes_dir}", "--engine=spark", f"--output_graph={tmp_path}/g.onnx"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (
        "lastlayer: error: --engine=spark needs pyspark, which is not installed: "
        "pip install 'lastlayer[spark]' (and Java 17+)"
    )


def test_spark_refuses_what_executors_cannot_read_and_shards():
    with pytest.raises(UsageError, match="memory://"):
        spark.check_url("memory://photos/a.jpg")
    code = main(["retrain", "--engine=spark", "--worker_count=2"])
    assert code == 2


def test_executors_on_a_cluster_use_their_own_credentials_and_the_login_s_hadoop_settings():
    login = {"kerberos_principal": "tf@LOCAL", "kerberos_cache": "FILE:/d/cc", "hadoop_conf_dir": "/d/conf"}
    hdfs = {**login, "dfs.replication": "1"}
    driver = {"hdfs": hdfs, "viewfs": hdfs, "webhdfs": {"kerberos": True}}
    cluster = {"spark.hadoop.fs.defaultFS": "hdfs://nn:8020", "spark.kerberos.principal": "tf@LOCAL"}
    assert spark.executor_options(driver, "local[2]", cluster) == driver  # this machine: the same login
    remote = spark.executor_options(driver, "spark://127.0.0.1:7077", cluster)
    assert remote["hdfs"] == remote["viewfs"] == {"fs.defaultFS": "hdfs://nn:8020", "dfs.replication": "1"}
    assert remote["webhdfs"] == {"kerberos": True}
    assert spark.executor_options(None, "yarn", {}) == {}


def test_the_master_comes_from_the_flag_then_spark_s_configuration_then_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER", raising=False)
    monkeypatch.delenv("SPARK_HOME", raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    assert spark.resolve_master() == f"local[{available_cores()}]"
    (tmp_path / "spark-defaults.conf").write_text("# cluster\nspark.master   yarn\nspark.executor.cores 4\n")
    assert spark.resolve_master() == "yarn"
    assert spark.resolve_master("local[3]") == "local[3]"


def test_settings_carry_the_keytab_login_to_spark(tmp_path):
    from lastlayer.hadoop import ClusterConfig, HadoopLogin

    login = HadoopLogin(
        ClusterConfig(
            principal="tensorflow@LOCAL", keytab="/k/tensorflow.keytab", krb5_conf=str(tmp_path / "krb5.conf")
        )
    )  # not entered: spark_conf() only reads the flags
    conf = spark.settings("local[2]", login.spark_conf())
    assert conf["spark.kerberos.principal"] == "tensorflow@LOCAL"
    assert conf["spark.kerberos.keytab"] == "/k/tensorflow.keytab"
    assert conf["spark.driver.extraJavaOptions"] == f"-Djava.security.krb5.conf={tmp_path / 'krb5.conf'}"
    assert conf["spark.driver.defaultJavaOptions"].startswith(jvm.LOCAL_JVM_OPTIONS)
    assert conf["spark.driver.bindAddress"] == conf["spark.driver.host"] == "127.0.0.1"
    assert conf["spark.ui.enabled"] == "false"
    assert "spark.driver.host" not in spark.settings("yarn")


def test_a_session_that_does_not_start_says_what_failed():
    yarn = Exception(
        "An error occurred while calling None.org.apache.spark.api.java.JavaSparkContext.\n"
        ": org.apache.spark.SparkException: Application application_1_0001 failed 2 times due to AM "
        "Container exited with exitCode: 1\n\tat org.apache.spark.deploy.yarn.Client.run(Client.scala:1)"
    )
    line = spark.start_problem(yarn, "yarn", "/usr/bin/java")
    assert line.startswith("Spark could not start a session on the cluster of master yarn: ")
    assert "SparkException: Application application_1_0001 failed 2 times" in line and "Java" not in line
    gateway = Exception("[JAVA_GATEWAY_EXITED] Java gateway process exited before sending its port number.")
    line = spark.start_problem(gateway, "spark://h:7077", "/usr/bin/java")
    assert "launcher exited before starting a session for master spark://h:7077" in line
    assert "Java 17+" in spark.start_problem(gateway, "local[2]", None)
    local = spark.start_problem(Exception("java.net.BindException: Cannot assign address"), "local[2]", "/j")
    assert local.startswith(
        "Spark could not start a session on this machine (local[2]): java.net.BindException"
    )


def test_without_java_the_session_fails_in_one_line_naming_java(tmp_path):
    code = (
        "from lastlayer.engines import spark\ntry: spark.start('local[1]')\nexcept Exception as e: print(e)"
    )
    env = {**os.environ, "JAVA_HOME": str(tmp_path / "no-java")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("Spark could not start: it needs Java 17+, none was found"), done.stdout
