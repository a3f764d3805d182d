"""The walkthrough on a real Kerberized HDFS: superuser set-up, `tensorflow` retrains, others are refused."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from helpers import ENV_KEYS, as_superuser, make_dataset, principal_flags, upload_for_tensorflow
from lastlayer.cli import main

INPUT = "/tensorflow_input_data/shapes"
RUN = "/tensorflow/test_run"


@pytest.fixture
def cluster_flags(secure_hdfs, monkeypatch):
    """Flags and a clean environment for running lastlayer in-process as one principal."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()

    def flags(user: str) -> list[str]:
        return principal_flags(secure_hdfs, user)

    yield flags
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()


def hdfs_fs(secure_hdfs, user: str | None, monkeypatch):
    """An hdfs-native fsspec filesystem authenticated as ``user`` (``None``: no ticket)."""
    for key, value in secure_hdfs.env(user).items():
        if key in ENV_KEYS:
            monkeypatch.setenv(key, value)
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()
    return fsspec.filesystem("hdfs", host="127.0.0.1", port=secure_hdfs.namenode_port)


@pytest.fixture(scope="module")
def walkthrough_input(secure_hdfs, tmp_path_factory):
    """As the `hdfs` superuser: the photos in /tensorflow_input_data, /tensorflow owned by tensorflow."""
    photos = make_dataset(tmp_path_factory.mktemp("photos") / "shapes", per_class=12)
    # the job tests' poets.json writes to the walkthrough's run folder too: start from none
    as_superuser(secure_hdfs, f"fs.rm('{RUN}', recursive=True) if fs.exists('{RUN}') else None\n")
    done = upload_for_tensorflow(secure_hdfs, photos, INPUT)
    assert json.loads(done.stdout)["copied"] == 36
    return photos


def retrain_flags(model_dir: Path, base: str = RUN) -> list[str]:
    return [
        f"--image_dir=hdfs://{INPUT}",
        "--how_many_training_steps=60",
        f"--bottleneck_dir=hdfs://{base}/bottlenecks",
        f"--model_dir=hdfs://{base}/models",
        f"--summaries_dir=hdfs://{base}/training_summaries/mobilenet_v2",
        f"--output_graph=hdfs://{base}/retrained_graph.onnx",
        f"--output_labels=hdfs://{base}/retrained_labels.txt",
        "--random_seed=3",
    ]


def test_tensorflow_retrains_on_hdfs_and_owns_the_outputs(
    secure_hdfs, walkthrough_input, cluster_flags, model_dir, caplog, monkeypatch
):
    with caplog.at_level(logging.INFO):
        assert main(["retrain", *retrain_flags(model_dir), *cluster_flags("tensorflow")]) == 0
    assert "Final test accuracy = " in caplog.text and ": Step 59: Validation accuracy = " in caplog.text
    fs = hdfs_fs(secure_hdfs, "tensorflow", monkeypatch)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(RUN, detail=False)}
    assert {
        "retrained_graph.onnx",
        "retrained_labels.txt",
        "training_summaries",
        "bottlenecks",
        "models",
    } <= names
    for path in ("retrained_graph.onnx", "retrained_labels.txt", "retrained_graph.summary.json"):
        assert fs.info(f"{RUN}/{path}")["owner"] == "tensorflow"
    assert fs.cat_file(f"{RUN}/retrained_labels.txt").decode() == "red circles\nblue squares\ngreen stripes\n"
    summary = json.loads(fs.cat_file(f"{RUN}/retrained_graph.summary.json"))
    assert summary["metrics"]["validation_and_test_accuracy"] >= 0.8
    assert not [p for p in fs.find(RUN) if "._lastlayer_tmp_" in p]
    parts = [p for p in fs.find(f"{RUN}/bottlenecks") if p.endswith(".parquet")]
    assert len(parts) == 1  # one file for 36 images, not one per image
    # a second run computes nothing: the cache on HDFS is read back
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()
    with caplog.at_level(logging.INFO):
        assert main(["retrain", *retrain_flags(model_dir), *cluster_flags("tensorflow")]) == 0
    assert "Bottlenecks: 0 computed, 36 from the cache" in caplog.text


def test_label_reads_the_model_from_hdfs(secure_hdfs, walkthrough_input, cluster_flags, capsys):
    graph = f"hdfs://{RUN}/retrained_graph.onnx"
    image = walkthrough_input / "blue_squares" / "img_003.jpg"
    assert main(["label", f"--graph={graph}", str(image), *cluster_flags("tensorflow")]) == 0
    assert capsys.readouterr().out.startswith("blue squares (score = ")


def test_a_client_without_a_ticket_is_refused(secure_hdfs, walkthrough_input, monkeypatch, capsys, tmp_path):
    hdfs_fs(secure_hdfs, None, monkeypatch)
    code = main(
        [
            "retrain",
            f"--image_dir=hdfs://{INPUT}",
            f"--bottleneck_dir={tmp_path}/b",
            f"--output_graph={tmp_path}/g.onnx",
            f"--model_dir={tmp_path}/m",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    print(last)
    assert last.startswith("lastlayer: error: cannot list hdfs://")
    assert "no valid Kerberos ticket" in last


def test_alice_cannot_write_into_tensorflow(
    secure_hdfs, walkthrough_input, cluster_flags, model_dir, capsys, monkeypatch
):
    base = "/tensorflow/alice_run"
    code = main(["retrain", *retrain_flags(model_dir, base), *cluster_flags("alice")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith("lastlayer: error: ") and "Permission denied" in last
    assert "user=alice" in last and "access=WRITE" in last and "/tensorflow" in last
    fs = hdfs_fs(secure_hdfs, "tensorflow", monkeypatch)
    assert not fs.exists(base)


def test_bob_maps_to_bob(secure_hdfs, capsys):
    core_site = secure_hdfs.conf_dir / "core-site.xml"
    for principal, short in (
        ("bob@LOCAL", "bob"),
        ("tensorflow@LOCAL", "tensorflow"),
        ("hdfs/localhost@LOCAL", "hdfs"),
    ):
        assert main(["auth-to-local", principal, f"--core_site={core_site}", "--default_realm=LOCAL"]) == 0
        assert capsys.readouterr().out.strip() == short == secure_hdfs.map_principal(principal)


def test_the_keytab_login_is_private_and_renewed(secure_hdfs, walkthrough_input, monkeypatch, caplog):
    """A login asking for 8-second tickets: its renewal thread logs in again from the keytab (3 s
    before the end, the 5-second margin), into the same private cache, while a client keeps working."""
    from lastlayer import storage
    from lastlayer.hadoop import ClusterConfig, HadoopLogin

    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KRB5_CONFIG", str(secure_hdfs.krb5_conf))  # as a library user starts Python
    keytab = secure_hdfs.keytab("tensorflow")
    config = ClusterConfig(
        principal=secure_hdfs.principal("tensorflow"),
        keytab=str(keytab),
        krb5_conf=str(secure_hdfs.krb5_conf),
        hadoop_conf_dir=str(secure_hdfs.conf_dir),
    )
    with caplog.at_level(logging.DEBUG), HadoopLogin(config, lifetime=8) as login:
        ccache = Path(login.ccache.removeprefix("FILE:"))
        assert (
            stat.S_IMODE(ccache.stat().st_mode) == 0o600
            and stat.S_IMODE(ccache.parent.stat().st_mode) == 0o700
        )
        fs, _ = storage.url_to_fs("hdfs:///", login.storage_options())
        assert fs.ls("/tensorflow_input_data", detail=False)
        first = login.starts
        deadline = time.monotonic() + 30
        while login.starts == first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert login.starts > first  # a new ticket, before the first one ended
        assert stat.S_IMODE(ccache.stat().st_mode) == 0o600
        time.sleep(max(0.0, first + 9 - time.time()))  # the first ticket has ended by now
        assert fs.ls("/tensorflow_input_data", detail=False)  # the client made before the renewal
        fsspec.get_filesystem_class("hdfs").clear_instance_cache()
        fresh, _ = storage.url_to_fs("hdfs:///", login.storage_options())
        assert fresh is not fs and fresh.ls("/tensorflow_input_data", detail=False)  # a new connection
    assert not ccache.parent.exists()  # the private folder goes with the login
    keytab_bytes = keytab.read_bytes()
    assert keytab_bytes.hex() not in caplog.text and "logging in again from the keytab" in caplog.text


def test_kdc_down_is_a_clear_error_not_a_hang(secure_hdfs, cluster_flags, capsys, model_dir, tmp_path):
    secure_hdfs.kdc_stop()
    try:
        start = time.monotonic()
        code = main(
            ["retrain", *retrain_flags(model_dir, "/tensorflow/kdc_down"), *cluster_flags("tensorflow")]
        )
        elapsed = time.monotonic() - start
    finally:
        secure_hdfs.kdc_start()
    err = capsys.readouterr().err
    assert code == 1 and elapsed < 60 and "Traceback" not in err
    assert "cannot log in as tensorflow@LOCAL" in err


def test_namenode_restart_during_a_retrain(
    secure_hdfs, walkthrough_input, cluster_flags, model_dir, tmp_path
):
    base = "/tensorflow/restart_run"
    argv = [
        sys.executable,
        "-m",
        "lastlayer",
        "retrain",
        *retrain_flags(model_dir, base),
        *cluster_flags("tensorflow"),
        "--num_threads=1",
        "--batch_size=1",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("Computing bottlenecks" in line for line in lines) and time.monotonic() < deadline:
        assert proc.poll() is None, "".join(lines)
        time.sleep(0.1)
    secure_hdfs.restart_namenode()
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()
    reader.join(timeout=10)
    text = "".join(lines)
    assert "Traceback" not in text
    if proc.returncode != 0:
        assert text.strip().splitlines()[-1].startswith("lastlayer: error: ")
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "Final test accuracy" in rerun.stderr


def test_label_over_webhdfs_with_spnego(secure_hdfs, walkthrough_input, cluster_flags, capsys):
    pytest.importorskip("requests_kerberos", reason="webhdfs:// with SPNEGO needs lastlayer[webhdfs]")
    graph = f"webhdfs://localhost:{secure_hdfs.http_port}{RUN}/retrained_graph.onnx"
    image = walkthrough_input / "Red Circles" / "img_004.jpg"
    assert main(["label", f"--graph={graph}", str(image), *cluster_flags("tensorflow")]) == 0
    assert capsys.readouterr().out.startswith("red circles (score = ")


@pytest.mark.slow
def test_spark_engine_reads_hdfs_and_writes_the_cache_as_tensorflow(
    secure_hdfs, walkthrough_input, cluster_flags, model_dir, monkeypatch
):
    """Spark logs in from the keytab itself (spark.kerberos.*), its executors read the photos from the
    secure HDFS, and the cache it fills is the local engine's: a local run then computes nothing."""
    base = "/tensorflow/spark_run"
    argv = [
        sys.executable,
        "-m",
        "lastlayer",
        "retrain",
        *retrain_flags(model_dir, base),
        *cluster_flags("tensorflow"),
        "--spark_master=local[2]",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}  # no ticket cache prepared
    done = subprocess.run([*argv, "--engine=spark"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Spark reads the images as tensorflow@LOCAL (KERBEROS, keytab)" in done.stderr
    assert "Bottlenecks: 36 computed, 0 from the cache, 0 skipped" in done.stderr
    fs = hdfs_fs(secure_hdfs, "tensorflow", monkeypatch)
    parts = [p for p in fs.find(f"{base}/bottlenecks") if p.endswith(".parquet")]
    assert len(parts) == 1 and fs.info(parts[0])["owner"] == "tensorflow"
    local = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-4000:]
    assert "Bottlenecks: 0 computed, 36 from the cache, 0 skipped" in local.stderr
