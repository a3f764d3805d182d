"""Hostile and careless input, second round (issue 19): the report, the server, tampered models,
special files and careless numbers. docs/reliability.md lists what each test promises (**G1**...).

Each test failed on the code before its fix.
"""

from __future__ import annotations

import http.server
import json
import os

import pytest
from PIL import Image

from helpers import serve_http
from lastlayer import report
from lastlayer.cli import main

REPORT_MARK = '<meta name="generator" content="lastlayer">'


def one_line(err: str) -> str:
    """The single ``lastlayer: error:`` line of a command's stderr (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lastlayer: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- the report ------------------------------------------------------------------------------


def summary_of(image_dir: str, labels: list[str] | None = None, **changes: object) -> dict:
    """A small run summary as lastlayer writes it, with ``changes``."""
    labels = labels or ["a", "b"]
    n = len(labels)
    summary = {
        "lastlayer_version": "0",
        "architecture": "mobilenet",
        "image_dir": image_dir,
        "labels": labels,
        "image_counts": {lb: {"training": 1, "validation": 0, "testing": 1} for lb in labels},
        "images": {"found": 2 * n, "used": 2 * n, "skipped": 0},
        "skipped": [],
        "metrics": {"test_accuracy": 0.5, "test_n": n},
        "confusion_matrix": {"matrix": [[1 if i == j else 0 for j in range(n)] for i in range(n)]},
        "per_class": {lb: {"precision": 1.0, "recall": 1.0, "support": 1} for lb in labels},
        "cache": {},
        "timings": {"total_s": 1.5},
        "outputs": {"output_graph": "/tmp/model.onnx"},
        "options": {},
        "misclassified": [],
    }
    summary.update(changes)
    return summary


def wrong(path: str) -> dict:
    return {"path": path, "true_label": "a", "predicted_label": "b", "score": 0.9, "true_score": 0.1}


def test_report_writes_beside_the_summary_never_where_its_content_says(tmp_path, capsys):
    victim = tmp_path / "home" / "authorized_keys"
    victim.parent.mkdir()
    victim.write_text("ssh-ed25519 AAAA the owner's key\n")
    evil = summary_of(str(tmp_path), labels=["x\nssh-ed25519 AAAAC3Nz attacker\n", "b"])
    evil["outputs"]["report"] = str(victim)
    (tmp_path / "evil.summary.json").write_text(json.dumps(evil))
    assert main(["report", str(tmp_path / "evil.summary.json")]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(tmp_path / "evil.report.html")}
    assert victim.read_text() == "ssh-ed25519 AAAA the owner's key\n"
    html = (tmp_path / "evil.report.html").read_text()
    assert "\nssh-ed25519 AAAAC3Nz attacker" not in html and "xssh-ed25519 AAAAC3Nz attacker" in html


def test_report_refuses_to_replace_a_file_that_is_not_a_report(tmp_path, capsys):
    (tmp_path / "s.summary.json").write_text(json.dumps(summary_of(str(tmp_path))))
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    assert main(["report", str(tmp_path / "s.summary.json"), f"--output={precious}"]) == 1
    assert "is not a lastlayer report: refusing to replace it" in one_line(capsys.readouterr().err)
    assert precious.read_text() == "mine"
    (tmp_path / "s.report.html").write_text("<html>someone else's page</html>")
    assert main(["report", str(tmp_path / "s.summary.json")]) == 1
    assert "refusing to replace it" in capsys.readouterr().err
    (tmp_path / "s.report.html").unlink()
    assert main(["report", str(tmp_path / "s.summary.json")]) == 0  # a report replaces a report
    assert main(["report", str(tmp_path / "s.summary.json")]) == 0
    assert REPORT_MARK in (tmp_path / "s.report.html").read_text()


class Counting(http.server.BaseHTTPRequestHandler):
    """Counts the requests it gets and answers a PNG."""

    hits = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(404)
        self.end_headers()


def test_report_reads_thumbnails_only_below_the_image_folder_and_fetches_nothing(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 0, 0)).save(images / "a" / "ok.png")
    Image.new("RGB", (40, 40), (0, 0, 200)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", images / "a" / "link.png")
    paths = ["a/ok.png", "../secret.png", str(tmp_path / "secret.png"), "a/link.png"]
    summary = summary_of(str(images), misclassified=[wrong(p) for p in paths])
    html = report.build(summary, report_url=str(tmp_path / "r.html"))
    assert html.count("data:image/jpeg;base64,") == 1
    assert "not a path below the image folder" in html and "a link out of the image folder" in html
    rooted = summary_of("/", misclassified=[wrong(str(tmp_path / "secret.png")[1:])])
    assert "no image folder" in report.build(rooted, report_url=str(tmp_path / "r.html"))
    Counting.hits = 0
    with serve_http(Counting) as url:
        remote = summary_of(url + "/images", misclassified=[wrong("a/x.png")])
        (tmp_path / "remote.summary.json").write_text(json.dumps(remote))
        assert main(["report", str(tmp_path / "remote.summary.json")]) == 0
        assert Counting.hits == 0
        assert "pass --fetch_images" in (tmp_path / "remote.report.html").read_text()
        assert main(["report", str(tmp_path / "remote.summary.json"), "--fetch_images"]) == 0
        assert Counting.hits == 1
    capsys.readouterr()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (json.dumps(summary_of("/x")).replace('"options": {}', '"options": ' + nested(100_000)), "nested"),
        (json.dumps(summary_of("/x")).replace('"options": {}', '"options": ' + nested(40)), "nested deeper"),
        (json.dumps(summary_of("/x")).replace('"total_s": 1.5', '"total_s": ' + "1" * 400), "out of range"),
        (json.dumps(summary_of("/x")).replace('"total_s": 1.5', '"total_s": 1e400'), "out of range"),
        (json.dumps(summary_of("/x")).replace('"total_s": 1.5', '"total_s": NaN'), "not a number"),
        (json.dumps(summary_of("/x", labels=[1, 2])), "a label is not a string"),
        (json.dumps(summary_of("/x", metrics=[])), "metrics is a list"),
        (json.dumps(summary_of("/x", per_class={"a": 3})), "an entry of per_class is not an object"),
        (json.dumps(summary_of("/x", misclassified=["a"])), "an entry of misclassified is not an object"),
        (json.dumps(summary_of("/x", timings={"total_s": "long"})), "the run summary is not as lastlayer"),
    ],
    ids=[
        "nested-100000",
        "nested-40",
        "huge-int",
        "huge-float",
        "nan",
        "labels",
        "metrics",
        "per-class",
        "misclassified",
        "timings",
    ],
)
def test_report_refuses_a_malformed_summary_in_one_line(tmp_path, capsys, text, needle):
    (tmp_path / "bad.summary.json").write_text(text)
    assert main(["report", str(tmp_path / "bad.summary.json")]) == 1
    assert needle in one_line(capsys.readouterr().err)
    assert not (tmp_path / "bad.report.html").exists()


def test_report_of_a_million_classes_is_refused_and_its_tables_are_capped(tmp_path, capsys):
    labels = [f"c{i}" for i in range(1_000_000)]
    huge = summary_of("/x", confusion_matrix={"matrix": []})
    huge["labels"] = labels
    (tmp_path / "huge.summary.json").write_text(json.dumps(huge))
    assert main(["report", str(tmp_path / "huge.summary.json")]) == 1
    assert "1,000,000 classes, more than a report shows" in one_line(capsys.readouterr().err)
    many = summary_of("/x", labels=[f"c{i}" for i in range(2000)])
    html = report.build(many)
    assert html.count("<td>c1") < 2 * (report.MAX_TABLE_ROWS + 1)
    assert "1,500 more rows: see the summary file" in html
