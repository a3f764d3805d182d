"""The labels file on a real Kerberized HDFS: images and their labels file uploaded to hdfs://, a run
as the `tensorflow` principal reading both (a full hdfs:// URL among the paths, a group, a bad row)."""

from __future__ import annotations

import csv
import json

from helpers import as_superuser, lastlayer_as, make_dataset

BASE = "/tensorflow_labels"
FOLDERS = ("Red Circles", "blue_squares", "green-stripes")


def test_a_run_reads_its_labels_file_and_images_from_hdfs(secure_hdfs, tmp_path, model_dir):
    data = tmp_path / "data"
    make_dataset(data / "images", per_class=8)
    (data / "meta").mkdir()
    rows = [
        [f"{d}/{p.name}", d.lower()[:4], "", ""]
        for d in FOLDERS
        for p in sorted((data / "images" / d).iterdir())
    ]
    rows[0][0] = f"hdfs://{BASE}/data/images/{rows[0][0]}"  # a full URL under --image_dir
    for row in rows[1:7]:
        row[3] = "plant-1"  # one group: one split
    rows.append(["Red Circles/gone.jpg", "red ", "", ""])  # line 26: no such image
    with (data / "meta" / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split", "group"], *rows])
    as_superuser(
        secure_hdfs,
        f"fs.makedirs('{BASE}', exist_ok=True)\nfs.client.set_owner('{BASE}', 'tensorflow', 'tensorflow')\n",
    )
    done = lastlayer_as(secure_hdfs, "tensorflow", "upload", str(data), f"hdfs://{BASE}/data")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    done = lastlayer_as(
        secure_hdfs,
        "tensorflow",
        "retrain",
        f"--image_dir=hdfs://{BASE}/data/images",
        f"--labels_file=hdfs://{BASE}/data/meta/labels.csv",
        "--how_many_training_steps=30",
        f"--bottleneck_dir=hdfs://{BASE}/bottlenecks",
        f"--model_dir={model_dir}",
        f"--output_graph={out / 'g.onnx'}",
        f"--output_labels={out / 'l.txt'}",
        f"--summaries_dir={out / 's'}",
        "--random_seed=4",
    )
    assert done.returncode == 0, done.stderr
    assert "skipped 1 bad row (line 26: no image 'Red Circles/gone.jpg' under --image_dir)" in done.stderr
    summary = json.loads((out / "g.summary.json").read_text())
    assert summary["labels"] == ["blue", "gree", "red"] and summary["images"]["found"] == 24
    assert summary["label_source"]["labels"] == f"hdfs://{BASE}/data/meta/labels.csv"
    assert summary["label_source"]["splits"]["hash of the group"] == 6
