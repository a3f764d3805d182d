"""retrain's stages, each alone: scan, bottlenecks (with a stand-in engine), waiting for shards, fit,
evaluate, export and summarize; and the run summary's shape."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from helpers import FakeEngine, make_dataset
from lastlayer import pipeline
from lastlayer.bottlenecks.extraction import extract, wait_for_shards
from lastlayer.dataset import TESTING, TRAINING, VALIDATION
from lastlayer.engines.base import NeedTest, Result, Task
from lastlayer.errors import DataError, UsageError
from lastlayer.model import contract
from lastlayer.model.export import write_model
from lastlayer.model.inference import label
from lastlayer.preprocess import Distortions
from lastlayer.settings.run import CacheConfig, EngineConfig, OutputConfig, TrainingConfig
from lastlayer.summary import RunSummary, ShardResult
from lastlayer.training import fit as training_fit
from lastlayer.training.data import TrainingData, load
from lastlayer.training.evaluate import evaluate
from lastlayer.training.fit import fit
from lastlayer.training.train import Classifier
from lastlayer.zoo import DEFAULT_ARCHITECTURE, Backbones, FeatureModel, load_feature_model, resolve

DIM = 8


class ClassFeatures(FakeEngine):
    """A stand-in engine for stage tests: the features of an image are a one-hot of its class folder
    plus noise, so that a softmax separates them; it counts what it was asked to compute."""

    name = "test"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def extract(
        self,
        tasks: Sequence[Task],
        model: FeatureModel,
        need: NeedTest,
        distortions: Distortions,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Result]:
        folders = sorted({t.relpath.split("/")[0] for t in tasks})
        for task in tasks:
            self.asked.append(task.relpath)
            vec = np.random.default_rng(task.index).normal(0, 0.1, model.feature_size).astype(np.float32)
            vec[folders.index(task.relpath.split("/")[0]) % model.feature_size] += 1.0
            yield Result(task, f"{task.index:064x}", plain=vec)


@pytest.fixture(scope="module")
def tiny_model() -> Backbones:
    """A network that is never run (the stand-in engine computes the features)."""
    preprocessing = resolve(DEFAULT_ARCHITECTURE)[1].preprocessing
    return Backbones((FeatureModel("tiny", b"", preprocessing, DIM, "0" * 64),))


def run_for(tmp_path, image_dir, **training) -> pipeline.Run:
    out = tmp_path / "out"
    return pipeline.Run(
        str(image_dir),
        "tiny",
        TrainingConfig(how_many_training_steps=60, random_seed=3, **training),
        CacheConfig(bottleneck_dir=str(tmp_path / "cache"), model_dir=str(tmp_path / "models")),
        OutputConfig(
            output_graph=str(out / "g.onnx"),
            output_labels=str(out / "l.txt"),
            summaries_dir=str(out / "s"),
        ),
        EngineConfig(),
        {},
    )


def test_scan_and_extract_stages_cache_what_the_engine_computed(tmp_path, tiny_model, caplog):
    data = make_dataset(tmp_path / "data", per_class=10)
    run = run_for(tmp_path, data)
    images = pipeline.scan_images(str(data), run.training, None)
    assert images.labels == ("red circles", "blue squares", "green stripes") and len(images.files) == 30
    engine = ClassFeatures()
    with caplog.at_level(logging.INFO):
        first = extract(images, tiny_model, engine, run.source(), None)
    assert first.computed == 30 and len(engine.asked) == 30
    assert "Bottlenecks: 30 computed, 0 from the cache, 0 skipped" in caplog.text
    again = extract(images, tiny_model, engine, run.source(), None)
    assert again.computed == 0 and again.reused == 30 and len(engine.asked) == 30
    assert np.array_equal(again.read(np.arange(30)), first.read(np.arange(30)))


def test_a_worker_computes_its_shard_and_worker_0_gives_up_waiting_after_its_limit(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=10)
    run = run_for(tmp_path, data)
    run.engine = EngineConfig(worker_index=1, worker_count=2, shard_wait_seconds=0.01)
    images = pipeline.scan_images(str(data), run.training, None)
    shard = extract(images, tiny_model, ClassFeatures(), run.source(), None)
    assert 0 < shard.computed < 30 and shard.pending == 30 - shard.computed
    result = pipeline._shard_result(run.engine, tiny_model, shard)
    assert result == ShardResult(1, 2, "tiny", {"computed": shard.computed, "reused": 0})
    assert json.loads(result.to_json())["worker_index"] == 1
    run.engine = EngineConfig(worker_index=0, worker_count=2, shard_wait_seconds=0.01)
    mine = extract(images, tiny_model, ClassFeatures(), run.source(), None)
    assert mine.pending == 0  # worker 1's shard is cached: nothing to wait for
    (tmp_path / "cache").rename(tmp_path / "gone")
    alone = extract(images, tiny_model, ClassFeatures(), run.source(), None)
    with pytest.raises(DataError, match=r"images of other workers' shards are still not in .* after 0 s"):
        wait_for_shards(
            images, tiny_model, ClassFeatures(), run.source(), alone, run.engine.shard_wait_seconds
        )


def stage_inputs(tmp_path, tiny_model, per_class=10, **training):
    data = make_dataset(tmp_path / "data", per_class=per_class)
    run = run_for(tmp_path, data, **training)
    images = pipeline.scan_images(str(data), run.training, None)
    bottlenecks = extract(images, tiny_model, ClassFeatures(), run.source(), None)
    return run, images, TrainingData.of(images, bottlenecks)


def test_training_data_needs_every_class_in_the_training_split(tmp_path, tiny_model):
    _run, images, data = stage_inputs(tmp_path, tiny_model)
    assert sum(len(v) for v in data.index.values()) == 30
    assert data.bottlenecks.read(data.index[TRAINING]).shape == (len(data.index[TRAINING]), DIM)
    usable = data.bottlenecks.usable.copy()
    usable[[f.label_index == 2 for f in images.files]] = False  # every image of one class unusable
    broken = dataclasses.replace(data.bottlenecks, usable=usable)
    with pytest.raises(DataError, match=r"class\(es\) 'green stripes' have no usable training images"):
        TrainingData.of(images, broken)


def test_fit_trains_logs_and_writes_summaries_and_intermediate_models(tmp_path, tiny_model, monkeypatch):
    run, images, data = stage_inputs(tmp_path, tiny_model)
    run.outputs = OutputConfig(
        summaries_dir=str(tmp_path / "s"),
        intermediate_store_frequency=25,
        intermediate_output_graphs_dir=str(tmp_path / "inter"),
    )
    saved: list[int] = []
    monkeypatch.setattr(
        training_fit, "build_classifier", lambda model, clf, labels, name: saved.append(1) or b"x"
    )
    clf, last = fit(data, tiny_model, images.labels, run.training, run.outputs, run.storage_options, seed=3)
    assert clf.weights.shape == (DIM, 3) and last is not None and last.step == 59
    assert last.train_accuracy > 0.9
    assert sorted(p.name for p in (tmp_path / "inter").iterdir()) == [
        "intermediate_25.onnx",
        "intermediate_50.onnx",
    ]
    assert len(saved) == 2
    assert any((tmp_path / "s" / "train").iterdir()) and any((tmp_path / "s" / "validation").iterdir())


def test_evaluate_scores_every_split_and_the_confusion_matrix(tmp_path, tiny_model, caplog):
    run, images, data = stage_inputs(tmp_path, tiny_model)
    perfect = Classifier(np.eye(DIM, 3, dtype=np.float32), np.zeros(3, np.float32))
    with caplog.at_level(logging.INFO):
        scores = evaluate(perfect, data, images, -1, 3, run.outputs)
    n_test = len(data.index[TESTING])
    assert scores.test_accuracy == 1.0 and scores.test_n == n_test
    assert f"Final test accuracy = 100.0% (N={n_test})" in caplog.text
    share = np.bincount(data.labels[TESTING]).max() / n_test
    assert f"Balanced accuracy = 100.0%, macro-F1 = 100.0% (N={n_test}); always answering" in caplog.text
    assert f"would score {100 * share:.1f}%" in caplog.text and scores.largest_share == pytest.approx(share)
    assert scores.accuracy_all == {TRAINING: 1.0, VALIDATION: 1.0, TESTING: 1.0, "held_out": 1.0}
    assert np.array_equal(np.diag(scores.confusion), np.bincount(data.labels[TESTING], minlength=3))
    wrong = Classifier(np.roll(np.eye(DIM, 3, dtype=np.float32), 1, axis=1), np.zeros(3, np.float32))
    outputs = OutputConfig(print_misclassified_test_images=True)
    with caplog.at_level(logging.INFO):
        sampled = evaluate(wrong, data, images, 7, 3, outputs)
    assert sampled.test_accuracy == 0.0 and sampled.test_n == 7
    assert "=== MISCLASSIFIED TEST IMAGES ===" in caplog.text


def test_export_writes_a_model_that_label_reads_back(tmp_path, model_dir):
    model = Backbones((load_feature_model(DEFAULT_ARCHITECTURE, str(model_dir)),))
    clf = Classifier(np.zeros((model.feature_size, 2), np.float32), np.array([0.0, 1.0], np.float32))
    outputs = OutputConfig(output_graph=str(tmp_path / "m.onnx"), output_labels=str(tmp_path / "l.txt"))
    write_model(model, clf, ("cat", "dog"), outputs, 5, None)
    assert (tmp_path / "l.txt").read_text() == "cat\ndog\n"
    meta = contract.metadata(onnx.load(str(tmp_path / "m.onnx")))
    assert meta[contract.SEED] == "5" and meta[contract.MODEL_KEY] == model.key
    make_dataset(tmp_path / "img", per_class=1)
    (prediction,) = label(str(tmp_path / "m.onnx"), [str(tmp_path / "img" / "blue_squares" / "img_000.jpg")])
    assert prediction.top[0][0] == "dog" and prediction.error is None


def test_the_whole_run_returns_a_summary_with_the_summary_file_s_keys(tmp_path, shapes_dir, model_dir):
    out = tmp_path / "out"
    summary = pipeline.retrain(
        str(shapes_dir),
        training=TrainingConfig(how_many_training_steps=20, random_seed=1),
        cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(tmp_path / "b")),
        outputs=OutputConfig(
            output_graph=str(out / "g.onnx"), output_labels=str(out / "l.txt"), summaries_dir=str(out / "s")
        ),
    )
    assert isinstance(summary, RunSummary)
    written = json.loads((out / "g.summary.json").read_text())
    assert written == json.loads(summary.to_json())
    assert list(written) == [
        "lastlayer_version", "architecture", "architecture_requested", "model_key", "seed", "image_dir",
        "labels", "image_counts", "images", "skipped", "metrics", "confusion_matrix", "per_class", "cache",
        "timings", "outputs", "options", "learning_curve", "misclassified", "trust", "label_source",
        "multi_label",
    ]  # fmt: skip
    assert written["multi_label"] is None
    assert written["label_source"] == {"labels": "class folders", "splits": {"hash of the path": 90}}
    assert list(written["timings"]) == [
        "model_s",
        "scan_s",
        "bottlenecks_s",
        "training_s",
        "trust_s",
        "export_s",
        "total_s",
    ]
    assert written["confusion_matrix"]["rows"] == "true label" and written["options"]["random_seed"] == 1
    assert written["outputs"]["summary_json"] == str(out / "g.summary.json")


def test_training_runs_on_one_blas_thread_and_the_caller_s_setting_comes_back(
    tmp_path, shapes_dir, model_dir
):
    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    seen: list[list[int]] = []
    with threadpool_limits(2, "blas"):
        pipeline.retrain(
            str(shapes_dir),
            training=TrainingConfig(how_many_training_steps=20, random_seed=1),
            cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(tmp_path / "b")),
            outputs=OutputConfig(
                output_graph=str(tmp_path / "g.onnx"), output_labels=str(tmp_path / "l.txt")
            ),
            on_evaluation=lambda *_: seen.append(blas_threads()),
        )
        after = blas_threads()
    assert seen and all(threads and set(threads) == {1} for threads in seen)
    assert after and set(after) == {2}


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match=r"--learning_rate=inf: must be a finite number"):
        pipeline.retrain(str(tmp_path), training=TrainingConfig(learning_rate=float("inf")))
    with pytest.raises(UsageError, match=r"--worker_index=2: must be in \[0, --worker_count\)"):
        pipeline.retrain(str(tmp_path), engine=EngineConfig(worker_index=2, worker_count=2))
    assert not any(tmp_path.iterdir())


def test_an_output_that_is_a_folder_is_refused_before_the_run(tmp_path, shapes_dir, capsys):
    # issue 9, finding 11: the final rename moved the model into the folder and the run reported success
    from lastlayer.cli import main

    folder = tmp_path / "models"
    folder.mkdir()
    argv = [
        "retrain",
        f"--image_dir={shapes_dir}",
        f"--output_graph={folder}",
        f"--bottleneck_dir={tmp_path / 'b'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lastlayer: error: --output_graph={folder}: is an existing folder; name a file in it"]
    assert not any(folder.iterdir()) and not (tmp_path / "b").exists()


def test_impossible_outputs_are_named_with_their_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    under_a_file = OutputConfig(output_graph=str(tmp_path / "file" / "sub" / "g.onnx"))
    with pytest.raises(UsageError, match=r"--output_graph=.*: its folder .*/file is a file"):
        pipeline.check_outputs(under_a_file, EngineConfig(), None)
    twice = OutputConfig(output_graph=str(tmp_path / "g.onnx"), output_labels=str(tmp_path / "g.onnx"))
    with pytest.raises(UsageError, match=r"--output_labels=.*: the same file as --output_graph"):
        pipeline.check_outputs(twice, EngineConfig(), None)
    pipeline.check_outputs(OutputConfig(output_graph=str(tmp_path / "new" / "g.onnx")), EngineConfig(), None)


def test_an_atomic_write_never_lands_inside_a_folder(tmp_path):
    from lastlayer import storage
    from lastlayer.errors import StorageError

    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError, match=r"cannot write .*/d: it is an existing folder"):
        storage.write_atomic(str(tmp_path / "d"), b"x")
    assert not any((tmp_path / "d").iterdir())


def test_a_run_that_diverges_fails_and_writes_no_model(tmp_path, shapes_dir, model_dir, capsys):
    # issue 9, finding 10, the training side: a huge finite learning rate trained to NaN and exited 0
    from lastlayer.cli import main

    out = tmp_path / "out"
    argv = [
        "retrain",
        f"--image_dir={shapes_dir}",
        "--learning_rate=1e38",
        "--how_many_training_steps=20",
        f"--model_dir={model_dir}",
        f"--bottleneck_dir={tmp_path / 'b'}",
        f"--output_graph={out / 'g.onnx'}",
        f"--output_labels={out / 'l.txt'}",
        f"--summaries_dir={out / 's'}",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lastlayer: error: training diverged") and "lower --learning_rate" in err[-1]
    assert not (out / "g.onnx").exists()


def test_a_part_found_damaged_when_streamed_sends_its_images_back_to_extraction(
    tmp_path, tiny_model, monkeypatch, caplog
):
    from lastlayer.bottlenecks import parts, store

    monkeypatch.setattr(store, "WHOLE_READ_BYTES", 0)  # keys load from their columns alone
    data = make_dataset(tmp_path / "data", per_class=10)
    run = run_for(tmp_path, data)
    images = pipeline.scan_images(str(data), run.training, None)
    engine = ClassFeatures()
    extract(images, tiny_model, engine, run.source(), None)
    (part,) = (tmp_path / "cache").rglob("part-*")
    metadata = pq.read_metadata(part).row_group(0).column(parts.part_schema(DIM).names.index("feature"))
    data_bytes = bytearray(part.read_bytes())
    data_bytes[metadata.data_page_offset + metadata.total_compressed_size // 2] ^= 0xFF
    part.write_bytes(bytes(data_bytes))
    bottlenecks = extract(images, tiny_model, engine, run.source(), None)
    assert bottlenecks.computed == 0 and bottlenecks.damaged_files == 0  # its keys still load
    with caplog.at_level(logging.WARNING):
        loaded = load(images, tiny_model, engine, run.source(), bottlenecks, None, run.training, 3)
    assert "damaged bottleneck cache file" in caplog.text
    assert hashlib.sha256(part.read_bytes()).hexdigest() in part.name  # written again, whole
    assert loaded.bottlenecks.computed == 30 and loaded.bottlenecks.damaged_files == 1
    clf, _ = fit(loaded, tiny_model, images.labels, run.training, run.outputs, run.storage_options, seed=3)
    assert evaluate(clf, loaded, images, -1, 3, run.outputs).accuracy_all[TRAINING] == 1.0
    loaded.close()
