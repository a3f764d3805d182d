"""The labels file (--labels_file): rows read by line, bad rows reported, splits from the split
column, groups or paths, and a run through it (the cache keyed by content)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import make_dataset
from lastlayer.cli import main
from lastlayer.dataset import SPLITS, TESTING, TRAINING, VALIDATION, label_for, scan, which_set
from lastlayer.errors import DataError, UsageError
from lastlayer.labels import read_labels
from lastlayer.labels.rows import MAX_LINE_CHARS
from lastlayer.settings.run import TrainingConfig

FOLDERS = ("Red Circles", "blue_squares", "green-stripes")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("labels") / "images", per_class=8)


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("path", "label")) -> str:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return str(path)


def folder_rows(data: Path) -> list[list[str]]:
    return [[f"{d}/{p.name}", label_for(d)] for d in FOLDERS for p in sorted((data / d).iterdir())]


def by_path(images) -> dict[str, tuple[str, str, str | None]]:
    return {f.relpath: (images.labels[f.label_index], f.split, f.stamp) for f in images.files}


def test_a_csv_that_mirrors_the_folders_gives_the_folder_scan_s_images_labels_and_splits(data, tmp_path):
    folders = scan(str(data), 20, 20)
    listed = read_labels(str(data), write_csv(tmp_path / "l.csv", folder_rows(data)[::-1]), (20, 20))
    assert by_path(listed) == by_path(folders) and len(by_path(listed)) == 24
    assert listed.labels == tuple(sorted(folders.labels))  # sorted by label (folders: by folder name)
    assert listed.origin == {"labels": str(tmp_path / "l.csv"), "splits": {"hash of the path": 24}}
    assert folders.origin["labels"] == "class folders"


def test_json_lines_and_full_urls_under_the_folder(data, tmp_path):
    lines = [
        json.dumps(
            {"path": f"file://{data}/{path}" if i % 2 else f"{data}/{path}", "label": label, "extra": 1}
        )
        for i, (path, label) in enumerate(folder_rows(data))
    ]
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n\n")
    images = read_labels(str(data), str(tmp_path / "l.jsonl"), (20, 20))
    assert by_path(images) == by_path(scan(str(data), 20, 20))


def test_json_lines_that_are_not_objects_are_bad_rows(data, tmp_path):
    good = [json.dumps({"path": p, "label": label}) for p, label in folder_rows(data)]
    lines = [*good, "[" * 60000, '"a string"', "{not json", json.dumps({"path": ["x"], "label": "a"})]
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        read_labels(str(data), str(tmp_path / "l.jsonl"), (20, 20), "refuse")
    assert (
        str(caught.value)
        .split(": ", 1)[1]
        .startswith(
            "4 bad rows (line 25: not JSON; line 26: not a JSON object; line 27: not JSON; "
            "line 28: path is not a string)"
        )
    )


def test_bad_rows_are_reported_by_line_then_skipped_or_refused(data, tmp_path, caplog):
    rows = folder_rows(data)
    bad = [
        ["nope/x.jpg", "red circles"],  # line 26: no such image
        [rows[0][0], ""],  # line 27: no label
        [rows[1][0], "blue squares", "later"],  # line 28: unknown split
        [rows[0][0], "red circles"],  # line 29: the image of line 2 again
        ["../outside.jpg", "red circles"],  # line 30: not under the folder
        ["/etc/passwd", "red circles"],  # line 31: not under the folder
        ["only-one-field"],  # line 32: wrong number of fields
    ]
    url = write_csv(
        tmp_path / "l.csv",
        [[*r, ""] for r in rows] + [r + [""] * (3 - len(r)) for r in bad[:6]] + bad[6:],
        ("path", "label", "split"),
    )
    with caplog.at_level(logging.WARNING):
        images = read_labels(str(data), url, (20, 20))
    assert len(images.files) == 24
    assert "7 bad rows" in caplog.text and "and 2 more" in caplog.text
    assert "line 26: no image 'nope/x.jpg'" in caplog.text and "line 27: no label" in caplog.text
    assert "line 28: unknown split 'later'" in caplog.text
    with pytest.raises(DataError, match=r"7 bad rows \(line 26.*--bad_label_rows=skip"):
        read_labels(str(data), url, (20, 20), "refuse")


def test_a_group_keeps_its_images_in_one_split_and_the_split_column_wins(data, tmp_path):
    rows = folder_rows(data)
    group_of = [f"object{i % 5}" for i in range(len(rows))]
    table = [[p, label, "", group] for (p, label), group in zip(rows, group_of, strict=True)]
    table[0][2] = "testing"  # object0: one row names its split, so the whole group takes it
    table[1] = [table[1][0], table[1][1], "validation", ""]  # no group: its own split
    table[2][3] = ""  # no group, no split: the hash of its path
    images = read_labels(
        str(data), write_csv(tmp_path / "l.csv", table, ("path", "label", "split", "group")), (30, 30)
    )
    split_of = {f.relpath: f.split for f in images.files}
    for path, _, split, group in table:
        if split:
            assert split_of[path] == split
        elif group == "object0":
            assert split_of[path] == TESTING
        elif group:
            assert split_of[path] == which_set(group, 30, 30)
        else:
            assert split_of[path] == which_set(path, 30, 30)
    groups = {g for g in group_of[3:] if g != "object0"}
    assert len({which_set(g, 30, 30) for g in groups}) > 1  # the groups do spread over the splits
    assert images.origin["splits"] == {
        "split column": 2,
        "split column of its group": sum(g == "object0" for g in group_of) - 1,
        "hash of the group": sum(g not in ("object0",) for g in group_of[3:]),
        "hash of the path": 1,
    }
    table[5][2] = "training" if split_of[table[5][0]] != TRAINING else "validation"
    table[5][3] = "object0"
    with pytest.raises(DataError, match=r"group 'object0'.*name different splits"):
        read_labels(
            str(data), write_csv(tmp_path / "m.csv", table, ("path", "label", "split", "group")), (30, 30)
        )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("file,class\na.jpg,x\n", "has no path or label column"),
        ("path\na.jpg\n", "has no label column"),
        ("path,label\n" + "x" * (MAX_LINE_CHARS + 5) + ",y\n", "line 2 of the labels file is longer"),
        (b"path,label\n\xff\xfe,x\n", "not UTF-8"),
        ("path,label\nRed Circles/img_000.jpg,one label only\n", "gives 1 label"),
        (
            "path,label\n" + '"open quote,x\n' + ("y" * 60000 + "\n") * 3,
            "record that begins on line 2 of the labels file is not CSV",
        ),
    ],
)
def test_a_file_that_is_not_a_labels_file_is_refused_in_one_line(data, tmp_path, text, needle):
    path = tmp_path / "l.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=needle):
        read_labels(str(data), str(path), (20, 20))


def test_only_a_regular_labels_file_is_read(data, tmp_path):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="a FIFO, not a regular file"):
        read_labels(str(data), str(fifo), (20, 20))
    with pytest.raises(DataError, match="is a folder"):
        read_labels(str(data), str(tmp_path), (20, 20))


def test_the_option_is_declared_with_its_limits():
    assert TrainingConfig(labels_file="l.csv", bad_label_rows="refuse").bad_label_rows == "refuse"
    with pytest.raises(UsageError, match="--bad_label_rows='maybe': must be one of skip, refuse"):
        TrainingConfig(bad_label_rows="maybe")


def run(tmp: Path, data: Path, model_dir: Path, labels: str, *extra: str) -> dict:
    out = tmp / "out"
    argv = [
        "retrain", f"--image_dir={data}", f"--labels_file={labels}", "--how_many_training_steps=40",
        f"--model_dir={model_dir}", f"--bottleneck_dir={tmp / 'cache'}", f"--output_graph={out / 'g.onnx'}",
        f"--output_labels={out / 'l.txt'}", f"--summaries_dir={out / 's'}", "--random_seed=7", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "g.summary.json").read_text())


def test_a_run_through_a_labels_file_and_a_changed_file_reuses_every_feature(data, tmp_path, model_dir):
    rows = folder_rows(data)
    table = [[p, label, SPLITS[i % 3]] for i, (p, label) in enumerate(rows)]
    summary = run(tmp_path, data, model_dir, write_csv(tmp_path / "a.csv", table, ("path", "label", "split")))
    assert summary["cache"]["computed"] == 24
    assert summary["label_source"] == {"labels": str(tmp_path / "a.csv"), "splits": {"split column": 24}}
    assert summary["images"] == {
        "found": 24,
        "used": 24,
        "skipped": 0,
        TRAINING: 8,
        VALIDATION: 8,
        TESTING: 8,
    }
    moved = [
        [p, "odd" if i % 2 else "even", ""] for i, (p, _, _) in enumerate(table)
    ]  # new labels and splits
    summary = run(tmp_path, data, model_dir, write_csv(tmp_path / "b.csv", moved, ("path", "label", "split")))
    assert summary["cache"] == {"computed": 0, "reused": 24, "damaged_files": 0}
    assert summary["labels"] == ["even", "odd"] and summary["label_source"]["splits"] == {
        "hash of the path": 24
    }
    assert np.array(summary["confusion_matrix"]["matrix"]).shape == (2, 2)


def test_a_job_s_context_names_the_labels_file(data, tmp_path, model_dir):
    """The walkthrough's job adapter passes --labels_file from a job's context (``{{shared_filesystem}}``
    becomes the task's log folder) to a real run."""
    spec = importlib.util.spec_from_file_location("poets", ROOT / "examples" / "poets" / "poets.py")
    poets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(poets)
    table = [[p, label, "testing" if i % 4 == 0 else ""] for i, (p, label) in enumerate(folder_rows(data))]
    write_csv(tmp_path / "labels.csv", table, ("path", "label", "split"))
    args = {
        "--image_dir": str(data), "--labels_file": "{{shared_filesystem}}/labels.csv",
        "--how_many_training_steps": 20, "--model_dir": str(model_dir), "--random_seed": 2,
        "--bottleneck_dir": "{{shared_filesystem}}/cache", "--output_graph": "{{shared_filesystem}}/g.onnx",
        "--output_labels": "{{shared_filesystem}}/l.txt", "--summaries_dir": "{{shared_filesystem}}/s",
    }  # fmt: skip
    poets.main(object(), str(tmp_path), {"args": args})
    summary = json.loads((tmp_path / "g.summary.json").read_text())
    assert summary["label_source"] == {
        "labels": str(tmp_path / "labels.csv"),
        "splits": {"split column": 6, "hash of the path": 18},
    }
    assert summary["image_counts"]["red circles"]["testing"] >= 2


def test_a_labels_file_without_an_image_folder_is_a_usage_error(capsys):
    assert main(["retrain", "--labels_file=labels.csv"]) != 0
    assert "--labels_file='labels.csv': needs --image_dir" in capsys.readouterr().err


def test_the_spark_engine_trains_the_same_model_from_a_labels_file(spark_session, data, tmp_path, model_dir):
    table = [[p, label, "", f"g{i % 7}"] for i, (p, label) in enumerate(folder_rows(data))]
    labels = write_csv(tmp_path / "l.csv", table, ("path", "label", "split", "group"))
    local = run(tmp_path / "local", data, model_dir, labels)
    spark = run(tmp_path / "spark", data, model_dir, labels, "--engine=spark")
    assert spark["options"]["engine"] == "spark" and spark["cache"]["computed"] == 24
    assert (
        spark["label_source"]
        == local["label_source"]
        == {"labels": labels, "splits": {"hash of the group": 24}}
    )
    graphs = [(tmp_path / name / "out" / "g.onnx").read_bytes() for name in ("local", "spark")]
    assert graphs[0] == graphs[1]


def test_a_missing_image_folder_is_named(data, tmp_path):
    url = write_csv(tmp_path / "l.csv", folder_rows(data))
    with pytest.raises(DataError, match=r"--image_dir .*/nowhere is not a folder"):
        read_labels(str(tmp_path / "nowhere"), url, (20, 20))
