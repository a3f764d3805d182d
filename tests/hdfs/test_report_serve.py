"""The report and the server where the outputs live on a real Kerberized HDFS: the report written to
hdfs:// with thumbnails read from hdfs://, rebuilt there by `lastlayer report`, and a model served
from hdfs:// by `lastlayer serve`, each as the `tensorflow` principal from its keytab."""

from __future__ import annotations

import json
import os
import sys

import fsspec
import httpx
import numpy as np
import pytest

from helpers import ENV_KEYS, as_superuser, jpeg_bytes, lastlayer_as, principal_flags, serving, shape_image
from lastlayer import storage
from test_report import SECTIONS, confusable

BASE = "/tensorflow_seen"
START_S = 120


@pytest.fixture(scope="module")
def trained_on_hdfs(secure_hdfs, tmp_path_factory):
    """As `tensorflow`: the confusable photos uploaded to hdfs:// and a run whose outputs are there."""
    photos = confusable(tmp_path_factory.mktemp("photos") / "confusable")
    as_superuser(
        secure_hdfs,
        f"fs.makedirs('{BASE}', exist_ok=True)\nfs.client.set_owner('{BASE}', 'tensorflow', 'tensorflow')\n",
    )
    done = lastlayer_as(secure_hdfs, "tensorflow", "upload", str(photos), f"hdfs://{BASE}/photos")
    assert done.returncode == 0, done.stderr
    done = lastlayer_as(
        secure_hdfs,
        "tensorflow",
        "retrain",
        f"--image_dir=hdfs://{BASE}/photos",
        "--how_many_training_steps=40",
        "--testing_percentage=30",
        f"--bottleneck_dir=hdfs://{BASE}/bottlenecks",
        f"--model_dir={tmp_path_factory.mktemp('models')}",
        f"--summaries_dir=hdfs://{BASE}/summaries",
        f"--output_graph=hdfs://{BASE}/out/model.onnx",
        f"--output_labels=hdfs://{BASE}/out/labels.txt",
        "--random_seed=4",
    )
    assert done.returncode == 0, done.stderr
    assert f"Save report to : hdfs://{BASE}/out/model.report.html" in done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def read_as_tensorflow(as_user):
    as_user("tensorflow")
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()
    yield lambda url: storage.read_bytes(url).decode()
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()


def test_the_report_is_written_on_hdfs_with_thumbnails_read_from_hdfs(trained_on_hdfs, read_as_tensorflow):
    assert trained_on_hdfs["report"] == f"hdfs://{BASE}/out/model.report.html"
    html = read_as_tensorflow(trained_on_hdfs["report"])
    summary = json.loads(read_as_tensorflow(f"hdfs://{BASE}/out/model.summary.json"))
    assert all(f'id="{s}"' in html for s in SECTIONS)
    assert summary["misclassified"] and "not shown:" not in html
    shown = len(summary["misclassified"]) + len(summary["trust"]["label_issues"]["listed"])
    assert html.count('src="data:image/jpeg;base64,') == shown  # both read from hdfs://
    assert summary["trust"]["calibration"] and summary["trust"]["unknown"] and summary["trust"]["duplicates"]


def test_lastlayer_report_rebuilds_it_on_hdfs(secure_hdfs, trained_on_hdfs, read_as_tensorflow):
    again = f"hdfs://{BASE}/out/again.report.html"
    done = lastlayer_as(
        secure_hdfs, "tensorflow", "report", f"hdfs://{BASE}/out/model.summary.json", f"--output={again}"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"report": again}
    assert 'id="misclassified"' in read_as_tensorflow(again)


def test_lastlayer_serve_serves_a_model_from_hdfs(secure_hdfs, trained_on_hdfs):
    argv = [sys.executable, "-m", "lastlayer", "serve", f"--graph=hdfs://{BASE}/out/model.onnx", "--port=0"]
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    image = jpeg_bytes(shape_image("square", np.random.default_rng(1)))
    argv += principal_flags(secure_hdfs, "tensorflow")
    with serving(argv, env, START_S) as server, httpx.Client(timeout=30) as client:
        reply = client.post(f"{server.base}/v1/models/model:classify", content=image)
    assert reply.status_code == 200 and reply.json()["labels"][0]["label"] == "blue squares"
