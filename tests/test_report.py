"""The run report: written by every run, self-contained, escaped, rebuilt by `lastlayer report`,
and rendered by a real browser (headless Chromium) with every section and no broken image."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import broken_images, chrome, console_errors, full_page_screenshot
from helpers import make_dataset, retrain_summary
from lastlayer import pipeline
from lastlayer.cli import main
from lastlayer.errors import DataError
from lastlayer.report import input as report_input
from lastlayer.report import page as report
from lastlayer.settings.run import CacheConfig, OutputConfig, TrainingConfig
from lastlayer.trust.memo import Memo

HOSTILE_FOLDER = "noise <b>&\"'"
HOSTILE_FILE = "<img src=x onerror=alert(1)>.jpg"
SECTIONS = (
    "headline",
    "dataset",
    "skipped",
    "curves",
    "confusion",
    "per-class",
    "misclassified",
    "trust",
    "settings",
)


def confusable(root: Path) -> Path:
    """Shapes plus two classes of pure noise (so some test images are misclassified), one class folder
    and one unreadable file named with HTML."""
    make_dataset(root, per_class=20)
    rng = np.random.default_rng(5)
    for folder in ("noise a", HOSTILE_FOLDER):
        (root / folder).mkdir()
        for i in range(20):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"n_{i:02d}.png")
    (root / "Red Circles" / HOSTILE_FILE).write_bytes(b"")
    return root


def run(tmp: Path, data: Path, model_dir: Path, steps: int = 60, **outputs: object) -> object:
    out = tmp / "out"
    return pipeline.retrain(
        str(data),
        training=TrainingConfig(how_many_training_steps=steps, testing_percentage=30, random_seed=4),
        cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(tmp / "bottlenecks")),
        outputs=OutputConfig(
            output_graph=str(out / "model.onnx"),
            output_labels=str(out / "labels.txt"),
            summaries_dir=str(out / "summaries"),
            **outputs,
        ),
    )


@pytest.fixture(scope="module")
def reported(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("report")
    data = confusable(tmp / "data")
    summary = run(tmp, data, model_dir)
    return tmp, data, summary


def test_every_run_writes_a_self_contained_escaped_report_beside_the_summary(reported):
    tmp, _, summary = reported
    page = tmp / "out" / "model.report.html"
    assert summary.outputs.report == str(page)
    assert json.loads((tmp / "out" / "model.summary.json").read_text())["outputs"]["report"] == str(page)
    html = page.read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'; img-src data:" in html
    sources = re.findall(r"""(?:src|href)=["']([^"']*)""", html)
    assert sources and all(s.startswith(("data:", "#")) for s in sources), {s[:40] for s in sources}
    assert "<script" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in html  # the skipped file, escaped
    assert "noise &lt;b&gt;&amp;&#34;&#39;/n_" in html  # a misclassified image's folder, escaped
    assert html.count("data:image/svg+xml;base64,") == 4  # data set, learning curves, confusion, reliability
    mistakes = html.split('id="misclassified"')[1].split("</section>")[0]
    assert mistakes.count('src="data:image/jpeg;base64,') == len(summary.misclassified) > 0
    suspects = summary.trust.label_issues
    assert suspects is not None
    assert html.count('src="data:image/jpeg;base64,') == len(summary.misclassified) + len(suspects.listed)


def test_the_charts_write_their_labels_as_svg_text_not_glyph_outlines(reported):
    tmp, _, _ = reported
    html = (tmp / "out" / "model.report.html").read_text()
    charts = [
        base64.b64decode(uri).decode() for uri in re.findall(r"data:image/svg\+xml;base64,([^\"']+)", html)
    ]
    assert len(charts) == 4
    assert all("<text" in svg and 'id="DejaVuSans-' not in svg for svg in charts)
    assert ">images</text>" in charts[0] and ">step</text>" in charts[1]  # the axes' names, as text


def test_the_summary_holds_the_learning_curve_and_the_worst_mistakes_first(reported):
    _, _, summary = reported
    curve = summary.learning_curve
    assert curve.step == [*range(0, 60, 10), 59]
    assert len(curve.train_accuracy) == len(curve.validation_cross_entropy) == 7
    assert all(0 <= a <= 1 for a in curve.train_accuracy)
    matrix = np.array(summary.confusion_matrix.matrix)
    wrong = summary.misclassified
    assert len(wrong) == matrix.sum() - np.trace(matrix) > 0
    assert [w.true_score for w in wrong] == sorted(w.true_score for w in wrong)
    assert all(w.true_label != w.predicted_label and w.score >= w.true_score for w in wrong)
    assert {w.path.split("/")[0] for w in wrong} <= {
        "Red Circles",
        "blue_squares",
        "green-stripes",
        "noise a",
        HOSTILE_FOLDER,
    }


@pytest.mark.browser
def test_the_report_renders_in_a_real_browser(reported):
    tmp, _, summary = reported
    page = tmp / "out" / "model.report.html"
    with chrome() as driver:
        driver.get(page.as_uri())
        for section in SECTIONS:
            element = driver.find_element("id", section)
            assert element.is_displayed() and element.size["height"] > 30, section
        assert not broken_images(driver)
        charts = driver.execute_script(
            "return [...document.querySelectorAll('img.chart')].map(i => i.naturalWidth)"
        )
        assert len(charts) == 4 and min(charts) > 300  # with the reliability diagram
        thumbnails = driver.find_elements("css selector", "#misclassified figure img")
        assert len(thumbnails) == len(summary.misclassified)
        assert "Test accuracy" in driver.find_element("id", "headline").text
        assert HOSTILE_FILE in driver.find_element("id", "skipped").text  # shown as text, not run
        assert not console_errors(driver)
        shot = full_page_screenshot(driver, tmp / "report.png")
    assert shot.stat().st_size > 50_000


def test_the_report_flag_turns_it_off(tmp_path, model_dir):
    data = make_dataset(tmp_path / "data", per_class=8)
    summary = run(tmp_path, data, model_dir, steps=10, report=False)
    assert summary.outputs.report == "" and not list((tmp_path / "out").glob("*.html"))


def test_lastlayer_report_rebuilds_the_report_from_the_summary(reported, tmp_path, capsys):
    tmp, _, _ = reported
    summary_file = tmp / "out" / "model.summary.json"
    elsewhere = tmp_path / "again.html"
    assert main(["report", str(summary_file), f"--output={elsewhere}"]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(elsewhere)}
    html = elsewhere.read_text()
    assert all(f'id="{s}"' in html for s in SECTIONS)
    (tmp / "out" / "model.report.html").unlink()
    assert main(["report", str(summary_file)]) == 0  # back where the run put it
    assert (tmp / "out" / "model.report.html").is_file()


def test_lastlayer_report_refuses_what_is_not_a_run_summary(tmp_path, capsys):
    (tmp_path / "x.json").write_text("not json")
    (tmp_path / "shard.json").write_text('{"worker_index": 1, "worker_count": 2}')
    assert main(["report", str(tmp_path / "x.json")]) == 1
    assert "is not JSON" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "shard.json")]) == 1
    assert "is not a run summary (no labels" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "report needs SUMMARY_JSON" in capsys.readouterr().err
    edited = {k: {} for k in report_input.REQUIRED_KEYS}
    edited |= {"labels": ["a"], "confusion_matrix": {"matrix": 3}}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert main(["report", str(tmp_path / "edited.json"), f"--output={tmp_path / 'r.html'}"]) == 1
    assert "confusion_matrix.matrix is not 1 x 1 counts" in capsys.readouterr().err


def test_thumbnails_are_bounded_and_an_unreadable_image_is_a_note(tmp_path):
    Image.new("RGB", (1200, 600), (10, 200, 10)).save(tmp_path / "big.png")
    Image.new("L", (28, 28), 128).save(tmp_path / "tiny.png")
    wrong = [
        {"path": name, "true_label": "a", "predicted_label": "b", "score": 0.9, "true_score": 0.1}
        for name in ("big.png", "tiny.png", "gone.png")
    ]
    big, tiny, gone = report._thumbnails(str(tmp_path), wrong, None)
    for thumb, size in ((big, (160, 80)), (tiny, (160, 160))):
        data = thumb.uri.removeprefix("data:image/jpeg;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == size
    assert gone.uri == "" and "cannot read" in gone.error and "gone.png" in gone.error


def test_a_summary_without_curves_or_mistakes_still_renders(reported):
    tmp, _, _ = reported
    old = json.loads((tmp / "out" / "model.summary.json").read_text())
    del old["learning_curve"], old["misclassified"]
    html = report.build(old)
    assert "No evaluation points were recorded" in html
    assert "test images are misclassified (this summary does not list them)" in html


def test_without_the_report_libraries_the_run_warns_and_goes_on(tmp_path, model_dir, monkeypatch, caplog):
    monkeypatch.setattr(
        report, "missing_libraries", lambda: "matplotlib not installed: pip install 'lastlayer[report]'"
    )
    data = make_dataset(tmp_path / "data", per_class=8)
    with caplog.at_level(logging.WARNING):
        summary = run(tmp_path, data, model_dir, steps=10)
    assert "No report written: matplotlib not installed: pip install 'lastlayer[report]'" in caplog.text
    assert summary.metrics.test_n >= 0 and not (tmp_path / "out" / "model.report.html").exists()


def test_read_summary_names_the_size_bound(tmp_path, monkeypatch):
    from lastlayer import fetch

    monkeypatch.setattr(report, "SUMMARY_LIMITS", fetch.Limits(10, 5, "lastlayer.report.SUMMARY_LIMITS"))
    (tmp_path / "s.json").write_text("{}" * 20)
    with pytest.raises(
        DataError, match=re.escape("more than the 10 allowed; raise lastlayer.report.SUMMARY_LIMITS")
    ):
        report.read_summary(str(tmp_path / "s.json"))


def test_a_run_whose_report_path_holds_another_file_keeps_it_and_warns(tmp_path, model_dir, caplog):
    data = make_dataset(tmp_path / "data", per_class=8)
    notes = tmp_path / "out" / "model.report.html"
    notes.parent.mkdir()
    notes.write_text("my notes, not a report")
    with caplog.at_level(logging.WARNING):
        summary = run(tmp_path, data, model_dir, steps=10)
    assert "No report written" in caplog.text and "not a lastlayer report" in caplog.text
    assert notes.read_text() == "my notes, not a report"
    assert (tmp_path / "out" / "model.onnx").is_file() and summary.outputs.report == str(notes)


def test_a_chart_of_the_same_data_is_read_from_the_memo_and_a_damaged_one_drawn_again(tmp_path):
    drawn = []

    def bars(fig, values: list[int]) -> bool:
        drawn.append(values)
        fig.subplots().bar(range(len(values)), values)
        return True

    charts = report.Charts(Memo(str(tmp_path / "memo")))
    first = charts(bars, [1, 2, 3])
    assert first.startswith("data:image/svg+xml;base64,") and drawn == [[1, 2, 3]]
    assert report.Charts(Memo(str(tmp_path / "memo")))(bars, [1, 2, 3]) == first and len(drawn) == 1
    assert charts(bars, [1, 2, 4]) != first and len(drawn) == 2
    for entry in (tmp_path / "memo").iterdir():
        entry.write_bytes(b"data:image/svg+xml;base64,<script>")
    redrawn = charts(bars, [1, 2, 3])
    assert redrawn.startswith("data:image/svg+xml;base64,") and "<" not in redrawn and len(drawn) == 3


def test_a_run_keeps_its_charts_in_the_cache_s_memo_and_the_re_run_reads_them(
    tmp_path, model_dir, shapes_dir
):
    retrain_summary(shapes_dir, tmp_path, model_dir, "cold", 20)
    kept = sorted((tmp_path / "b").glob("*/results/chart-*"))
    assert len(kept) >= 4
    stamps = [p.stat().st_mtime_ns for p in kept]
    retrain_summary(shapes_dir, tmp_path, model_dir, "warm", 20)
    assert sorted((tmp_path / "b").glob("*/results/chart-*")) == kept
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    cold, warm = ((tmp_path / n / "g.report.html").read_text() for n in ("cold", "warm"))
    assert re.findall(r"data:image/svg[^\"]+", cold) == re.findall(r"data:image/svg[^\"]+", warm)
