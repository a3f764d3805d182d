"""``--multi_label``: the labels column read into a multi-hot matrix, per-label thresholds and scores,
and a run end to end (sigmoid model, thresholds in its metadata, ``label`` answering a set)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from browser import broken_images, chrome, console_errors
from helpers import make_dataset
from lastlayer.cli import main
from lastlayer.dataset import SPLITS, label_for
from lastlayer.errors import ModelError, UsageError
from lastlayer.labels import read_labels
from lastlayer.model import contract
from lastlayer.model.inference import RetrainedModel
from lastlayer.settings.run import TrainingConfig
from lastlayer.training.multilabel import (
    DEFAULT_THRESHOLD,
    THRESHOLD_FLOOR,
    average_precision,
    choose_thresholds,
    score,
)

FOLDERS = ("Red Circles", "blue_squares", "green-stripes")
BLUE, GREEN, RED = (label_for(d) for d in ("blue_squares", "green-stripes", "Red Circles"))
ALL = (BLUE, "curvy", GREEN, RED)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("multi") / "images", per_class=12)


def table(data: Path) -> list[tuple[str, list[str], str]]:
    """Each image: its folder's label, plus ``curvy`` for circles and stripes; splits dealt in turn."""
    rows = []
    for d in FOLDERS:
        for i, p in enumerate(sorted((data / d).iterdir())):
            extra = ["curvy"] if d != "blue_squares" else []
            rows.append((f"{d}/{p.name}", [label_for(d), *extra], SPLITS[i % 3]))
    return rows


def write_csv(path: Path, rows: list[tuple[str, list[str], str]]) -> str:
    lines = ["path,labels,split", *(f"{p},{';'.join(labels)},{split}" for p, labels, split in rows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_labels_column_gives_a_multi_hot_matrix_in_csv_and_json_lines(data, tmp_path):
    rows = table(data)
    csv_images = read_labels(str(data), write_csv(tmp_path / "l.csv", rows), (20, 20), multi=True)
    lines = [json.dumps({"path": p, "labels": labels, "split": s}) for p, labels, s in rows]
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    json_images = read_labels(str(data), str(tmp_path / "l.jsonl"), (20, 20), multi=True)
    for images in (csv_images, json_images):
        assert images.labels == ALL
        hot = images.multi_hot
        assert hot is not None and hot.dtype == bool and hot.shape == (36, 4)
        by_path = {f.relpath: hot[i] for i, f in enumerate(images.files)}
        assert by_path[rows[0][0]].tolist() == [False, True, False, True]  # a red circle: curvy too
        assert by_path[rows[12][0]].tolist() == [True, False, False, False]  # a blue square
        first = {f.relpath: images.labels[f.label_index] for f in images.files}
        assert first[rows[0][0]] == RED  # the first label is the image's label
    single = read_labels(str(data), str(tmp_path / "l.csv"), (20, 20))  # without multi: first labels
    assert single.multi_hot is None and single.labels == (BLUE, GREEN, RED)


def test_a_labels_value_that_is_not_a_list_of_strings_is_a_bad_row(data, tmp_path):
    p = f"{FOLDERS[0]}/{sorted((data / FOLDERS[0]).iterdir())[0].name}"
    q = f"{FOLDERS[1]}/{sorted((data / FOLDERS[1]).iterdir())[0].name}"
    lines = [{"path": p, "labels": {"a": 1}}, {"path": q, "labels": ["x", "y"]}, {"path": p, "labels": []}]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    images = read_labels(str(data), str(tmp_path / "l.jsonl"), (20, 20), multi=True)
    assert len(images.files) == 1 and images.labels == ("x", "y")  # line 1: not a list, line 3: no label


def test_thresholds_take_the_best_f1_with_a_floor_and_a_default_for_rare_labels():
    probs = np.array(
        [[0.9, 0.05, 0.3], [0.8, 0.02, 0.2], [0.6, 0.01, 0.1], [0.2, 0.03, 0.9], [0.1, 0.04, 0.8]]
    )
    hot = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]], bool)
    t = choose_thresholds(probs, hot)
    assert t[0] == pytest.approx(0.4)  # all three positives (lowest 0.6), halfway to the next (0.2)
    assert t[1] == pytest.approx(THRESHOLD_FLOOR)  # best F1 at 0.01: floored
    assert t[2] == DEFAULT_THRESHOLD  # no positive in validation


def test_scores_by_hand():
    probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.6], [0.1, 0.1]], np.float32)
    hot = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    s = score(probs, hot, np.array([0.5, 0.5], np.float32), ("a", "b"))
    # a: ranks 0.9(+) 0.6(-) 0.4(+): AP = (1 + 2/3) / 2; b: 0.7(+) 0.6(+): AP = 1
    assert s.per_label["a"].average_precision == pytest.approx((1 + 2 / 3) / 2)
    assert (
        average_precision(probs[:, 1], hot[:, 1]) == 1.0
        and average_precision(probs[:, 0], hot[:, 1] & False) is None
    )
    assert s.mean_average_precision == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    # predicted: [a], [b], [a, b], []: a tp 1 fp 1 fn 1, b tp 2 fp 0 fn 0
    assert (s.per_label["a"].precision, s.per_label["a"].recall, s.per_label["a"].support) == (0.5, 0.5, 2)
    assert s.micro_f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert s.macro_f1 == pytest.approx((0.5 + 1.0) / 2)
    assert s.exact_match == 0.5 and s.test_n == 4


def test_multi_label_refuses_cross_validation():
    assert TrainingConfig(multi_label=True).multi_label
    with pytest.raises(UsageError, match="--cross_validation=3"):
        TrainingConfig(multi_label=True, cross_validation=3)


def test_a_multi_label_run_exports_sigmoids_and_thresholds_and_label_answers_a_set(
    data, tmp_path, model_dir, caplog, capsys
):
    with caplog.at_level(logging.INFO):
        out = multi_label_run(tmp_path, data, model_dir, "--how_many_training_steps=200")
    text = caplog.text
    assert "With --multi_label, calibration (--calibrate) is off" in text
    assert "With --multi_label, duplicates (--find_duplicates) is off" in text
    assert "Final test accuracy = " in text and "Mean average precision = " in text
    summary = json.loads((out / "g.summary.json").read_text())
    multi = summary["multi_label"]
    assert multi["test_n"] == 12 and set(multi["per_label"]) == set(ALL)
    assert multi["per_label"]["curvy"]["support"] == 8
    assert multi["mean_average_precision"] >= 0.9, multi  # the shapes are easy to tell apart
    assert summary["metrics"]["test_accuracy"] == multi["exact_match"]
    assert summary["trust"]["calibration"] is None
    for split in ("train", "validation"):  # TensorBoard's event files, as for one label per image
        assert list((out / "s" / split).glob("events.out.tfevents.*")), split

    proto = onnx.load(str(out / "g.onnx"))
    assert proto.graph.node[-1].op_type == "Sigmoid"
    thresholds = json.loads(contract.metadata(proto)[contract.THRESHOLDS])
    assert thresholds == [multi["per_label"][n]["threshold"] for n in summary["labels"]] or np.allclose(
        thresholds, [multi["per_label"][n]["threshold"] for n in summary["labels"]], atol=1e-6
    )
    model = RetrainedModel.load(str(out / "g.onnx"))
    assert model.info.thresholds is not None and len(model.info.thresholds) == 4

    circle = sorted((data / "Red Circles").iterdir())[2]  # a testing image
    capsys.readouterr()
    assert main(["label", f"--graph={out / 'g.onnx'}", "--json", str(circle)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert sorted(answer["answer"]) == sorted(["curvy", RED]), answer
    assert [x["label"] for x in answer["labels"]] == answer["answer"]
    assert all(x["score"] >= thresholds[summary["labels"].index(x["label"])] for x in answer["labels"])


def test_a_model_whose_thresholds_do_not_match_its_labels_is_refused_at_load(tmp_path, model_dir, data):
    out = multi_label_run(tmp_path, data, model_dir, "--how_many_training_steps=10")
    proto = onnx.load(str(out / "g.onnx"))
    for bad, why in (("[0.5]", "1 thresholds for 4 labels"), ('["x"]', "numbers in \\[0, 1\\]")):
        for p in proto.metadata_props:
            if p.key == contract.meta_key(contract.THRESHOLDS):
                p.value = bad
        onnx.save(proto, str(tmp_path / "bad.onnx"))
        with pytest.raises(ModelError, match=why):
            RetrainedModel.load(str(tmp_path / "bad.onnx"))


@pytest.mark.browser
def test_the_report_of_a_multi_label_run_shows_each_label_s_scores_in_a_real_browser(
    data, tmp_path, model_dir
):
    out = multi_label_run(tmp_path, data, model_dir, "--how_many_training_steps=100")
    with chrome() as driver:
        driver.get((out / "g.report.html").as_uri())
        scores = driver.find_element("id", "confusion")
        assert "Per label (test split)" in scores.text and "mean average precision" in scores.text
        assert "Confusion matrix (test split)" not in driver.page_source
        rows = driver.find_elements("css selector", "#per-class tbody tr")
        assert sorted(r.find_element("tag name", "td").text for r in rows) == sorted(ALL)
        assert "threshold" in driver.find_element("css selector", "#per-class thead").text
        chart = driver.find_element("css selector", "#confusion img.chart")
        assert driver.execute_script("return arguments[0].naturalWidth", chart) > 300
        assert not broken_images(driver) and not console_errors(driver)


def multi_label_run(tmp: Path, data: Path, model_dir: Path, *extra: str) -> Path:
    """A ``--multi_label`` run through the labels file of :func:`table` (cache in ``tmp/c``); its
    output folder."""
    out = tmp / "out"
    tmp.mkdir(exist_ok=True)
    argv = [
        "retrain", f"--image_dir={data}", f"--labels_file={write_csv(tmp / 'l.csv', table(data))}",
        "--multi_label", f"--model_dir={model_dir}", f"--bottleneck_dir={tmp / 'c'}",
        f"--output_graph={out / 'g.onnx'}", f"--output_labels={out / 'l.txt'}",
        f"--summaries_dir={out / 's'}", "--random_seed=7", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_the_spark_engine_trains_the_same_multi_label_model(spark_session, data, tmp_path, model_dir):
    local = multi_label_run(tmp_path / "local", data, model_dir, "--how_many_training_steps=40")
    spark = multi_label_run(
        tmp_path / "spark", data, model_dir, "--how_many_training_steps=40", "--engine=spark"
    )
    summaries = [json.loads((out / "g.summary.json").read_text()) for out in (local, spark)]
    assert summaries[1]["options"]["engine"] == "spark"
    assert summaries[1]["cache"]["computed"] == summaries[0]["cache"]["computed"] == len(table(data))
    assert summaries[1]["multi_label"] == summaries[0]["multi_label"]
    assert (local / "g.onnx").read_bytes() == (spark / "g.onnx").read_bytes()


def test_flags_a_multi_label_run_cannot_honour_are_named(data, tmp_path, model_dir, caplog):
    flags = (
        "--how_many_training_steps=20",
        "--intermediate_store_frequency=10",
        "--print_misclassified_test_images",
    )
    with caplog.at_level(logging.WARNING):
        out = multi_label_run(tmp_path, data, model_dir, *flags)
    for flag in ("--intermediate_store_frequency", "--print_misclassified_test_images"):
        assert f"{flag} is ignored with --multi_label" in caplog.text
    assert (out / "g.onnx").is_file()
