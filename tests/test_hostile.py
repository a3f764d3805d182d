"""Hostile and careless input, second round (issue 19): the report, the server, tampered models,
special files and careless numbers. docs/reliability.md lists what each test promises (**G1**...).

Each test failed on the code before its fix.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import onnx
import pytest
from PIL import Image

import test_serve
from helpers import make_dataset, serve_http, serving
from lastlayer.cli import main
from lastlayer.errors import ModelError
from lastlayer.jobs.plan import ERROR, new_plan
from lastlayer.model.inference import RetrainedModel
from lastlayer.report import page as report
from test_faults import retrain_argv, split_into_parts
from test_reliability import job_options, one_line_error
from test_reliability import lastlayer as lastlayer_child
from test_serve import REQUEST_S, START_S, _tensor, running, shape_jpeg

# the served model of test_serve's fixtures: a model trained on the shapes, and a server of it
graph, models, url = test_serve.graph, test_serve.models, test_serve.url

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
    with serve_http(Counting) as base:
        suspect = {"path": "a/y.png", "given_label": "a", "suggested_label": "b", "given_score": 0.1}
        suspect |= {"suggested_score": 0.9, "split": "training"}
        trust = {"label_issues": {"folds": 5, "images": 2, "suspected": 1, "listed": [suspect]}}
        remote = summary_of(base + "/images", misclassified=[wrong("a/x.png")], trust=trust)
        (tmp_path / "remote.summary.json").write_text(json.dumps(remote))
        assert main(["report", str(tmp_path / "remote.summary.json")]) == 0
        assert Counting.hits == 0
        assert "pass --fetch_images" in (tmp_path / "remote.report.html").read_text()
        assert main(["report", str(tmp_path / "remote.summary.json"), "--fetch_images"]) == 0
        assert Counting.hits == 2  # the misclassified image and the suspected label's
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
        (json.dumps(summary_of("/x", trust={"label_issues": {"listed": 5}})), "the run summary is not as"),
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
        "trust",
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


# --- the server --------------------------------------------------------------------------------


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    """A flat PNG: a few hundred bytes that decode to ``width x height`` pixels."""
    buf = io.BytesIO()
    Image.new(mode, (width, height), (90, 30, 200, 255)[: len(mode)]).save(buf, "PNG")
    return buf.getvalue()


def test_serve_closes_connections_whose_request_head_never_completes(models):
    with running(models, header_timeout=1.0, max_connections=40) as base:
        port = int(base.rsplit(":", 1)[1])
        stalled = []
        for _ in range(60):  # more than max_connections: every other client got 503 while they lasted
            sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_S)
            sock.sendall(b"POST /v1/models/shapes:classify HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            stalled.append(sock)
        try:
            closed = 0
            for sock in stalled:  # each is closed by the server within the deadline (and a margin)
                sock.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    closed += sock.recv(1024) == b""
            assert closed == len(stalled)
            with httpx.Client(timeout=REQUEST_S) as client:
                reply = client.post(f"{base}/v1/models/shapes:classify", content=shape_jpeg("circle"))
            assert reply.status_code == 200, reply.text
        finally:
            for sock in stalled:
                sock.close()


def test_serve_decodes_at_most_its_pixel_budget_at_once(models):
    image = png_bytes(2000, 2000)
    with running(models, max_pixels=4_000_000, max_decode_pixels=4_000_000) as base:
        barrier = threading.Barrier(8)

        def post(_: int) -> httpx.Response:
            with httpx.Client(timeout=REQUEST_S) as client:
                barrier.wait(REQUEST_S)
                return client.post(f"{base}/v1/models/shapes:classify", content=image)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    busy = next(r for r in replies if r.status_code == 503).json()["error"]
    assert "more than --max_decode_pixels=4,000,000 allows at once" in busy


@pytest.mark.parametrize(
    ("path", "content", "needle"),
    [
        ("/v2/models/shapes/infer", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("/v2/models/shapes/infer", json.dumps(_tensor(shape=[0, 224, 224, 3], data=[])), "holds no image"),
        ("/v2/models/shapes/infer", json.dumps(_tensor(shape=[0], datatype="BYTES", data=[])), "no image"),
        ("/v2/models/shapes/infer", json.dumps({"inputs": []}), "send the input(s)"),
        ("/v1/models/shapes:classify?top_k=%C2%B2", "x", "top_k='²': must be a whole number"),
        ("/v1/models/shapes:classify?top_k=" + "9" * 5000, "x", "must be a whole number"),
        ("/v2/models/shapes/infer", json.dumps(_tensor(data=[1.7] * (224 * 224 * 3))), "whole numbers"),
        ("/v2/models/shapes/infer", json.dumps(_tensor(data=["12"] * (224 * 224 * 3))), "whole numbers"),
        ("/v2/models/shapes/infer", json.dumps(_tensor(data=[True] * (224 * 224 * 3))), "whole numbers"),
    ],
    ids=[
        "nested",
        "zero-uint8",
        "zero-bytes",
        "no-inputs",
        "top-k-superscript",
        "top-k-huge",
        "uint8-1.7",
        "uint8-string",
        "uint8-bool",
    ],
)
def test_serve_answers_odd_requests_with_a_json_400_never_a_500(url, path, content, needle):
    with httpx.Client(timeout=REQUEST_S) as client:
        reply = client.post(url + path, content=content)
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["error"]


def test_serve_answers_only_the_host_names_it_serves(models):
    with (
        running(models, allowed_host=["lastlayer.example"]) as base,
        httpx.Client(timeout=REQUEST_S) as client,
    ):
        rebound = client.get(f"{base}/v2/models/shapes", headers={"Host": "attacker.example:8080"})
        assert rebound.status_code == 400
        assert "Host 'attacker.example:8080' is not a name of this server" in rebound.json()["error"]
        assert (
            client.get(f"{base}/v2/models/shapes", headers={"Host": "lastlayer.example"}).status_code == 200
        )
        assert client.get(f"{base}/v2/models/shapes", headers={"Host": "localhost:1"}).status_code == 200
        assert client.get(f"{base}/v2/models/shapes").status_code == 200


def status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def burst(base: str, path: str, bodies: list[bytes]) -> list[int]:
    """POST each body at once (a thread each); their statuses."""
    barrier = threading.Barrier(len(bodies))

    def post(body: bytes) -> int:
        with httpx.Client(timeout=120) as client:
            barrier.wait(REQUEST_S)
            return client.post(base + path, content=body).status_code

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_serve_holds_its_queue_before_decoding_and_gives_memory_back_after_a_burst(graph):
    tiny = base64.b64encode(png_bytes(4, 4)).decode()
    many = json.dumps(
        {"inputs": [{"name": "image", "shape": [64], "datatype": "BYTES", "data": [tiny] * 64}]}
    )
    argv = [
        sys.executable,
        "-m",
        "lastlayer",
        "serve",
        f"--graph=shapes={graph}",
        "--port=0",
        "--max_queue=64",
    ]
    with serving(argv, timeout=START_S) as server:
        pid = server.process.pid
        # a warm-up at full batches: onnxruntime's memory arena grows to what a batch needs
        assert burst(server.base, "/v2/models/shapes/infer", [many.encode()]) == [200]
        assert burst(server.base, "/v1/models/shapes:classify", [png_bytes(300, 300)] * 2) == [200, 200]
        time.sleep(1)
        before, peak_before = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        statuses = burst(server.base, "/v2/models/shapes/infer", [many.encode()] * 24)
        peak_tiny = status_kib(pid, "VmHWM")
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        big = burst(server.base, "/v1/models/shapes:classify", [png_bytes(2500, 2500, "RGBA")] * 10)
        assert set(big) <= {200, 503}, big
        time.sleep(2)
        after = status_kib(pid, "VmRSS")
        print(
            f"RSS before {before / 1024:.0f} MiB (peak so far {peak_before / 1024:.0f}), "
            f"peak of the tiny burst {peak_tiny / 1024:.0f} MiB, "
            f"after the bursts {after / 1024:.0f} MiB"
        )
    # 24 requests of 64 images decoded before the queue refused them would hold 1536 x 147 KiB = 220 MiB
    assert peak_tiny - max(before, peak_before) < 120 * 1024
    assert after - before < 100 * 1024


# --- models checked when loaded ------------------------------------------------------------------


def tampered(graph: Path, folder: Path, name: str, **meta: str) -> Path:
    """A copy of ``graph`` with ``lastlayer.*`` metadata replaced by ``meta``."""
    proto = onnx.load(str(graph))
    for prop in proto.metadata_props:
        key = prop.key.removeprefix("lastlayer.")
        if key in meta:
            prop.value = meta[key]
    out = folder / f"{name}.onnx"
    onnx.save(proto, str(out))
    return out


def preprocessing(graph: Path, **changes: object) -> dict[str, str]:
    """The ``preprocessing`` and ``inputs`` metadata of ``graph`` with ``changes`` to both."""
    proto = onnx.load(str(graph))
    meta = {p.key.removeprefix("lastlayer."): p.value for p in proto.metadata_props}
    text = json.dumps({**json.loads(meta["preprocessing"]), **changes})
    inputs = [{**entry, "preprocessing": text} for entry in json.loads(meta["inputs"])]
    return {"preprocessing": text, "inputs": json.dumps(inputs)}


def failing_graph(graph: Path, folder: Path) -> Path:
    """``graph`` with its output reshaped to a size its data cannot have: the graph fails to run."""
    proto = onnx.load(str(graph))
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
    shape = onnx.helper.make_tensor("bad_shape", onnx.TensorProto.INT64, [2], [7, -1])
    proto.graph.initializer.append(shape)
    proto.graph.node.append(onnx.helper.make_node("Reshape", [f"{out}_pre", "bad_shape"], [out]))
    del proto.graph.output[0].type.tensor_type.shape.dim[:]
    path = folder / "failing.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ({"labels": '"abc"'}, "lastlayer.labels metadata must be a JSON list of strings"),
        ({"labels": '{"a": 1}'}, "lastlayer.labels metadata must be a JSON list of strings"),
        ({"labels": "[1, 2, 3]"}, "lastlayer.labels metadata must be a JSON list of strings"),
        ({"labels": "[[[[" * 5000}, "lastlayer.labels metadata is not JSON"),
        ({"labels": '["a", "b"]'}, "it has 2 labels but its output 'final_result' gives 3 scores"),
        ({"labels": '["a", "b", "c", "d"]'}, "it has 4 labels but its output 'final_result' gives 3 scores"),
        ({"preprocessing": "size0"}, "has size 0; it must be in [1, 4096] px"),
        ({"preprocessing": "size100000"}, "has size 100000; it must be in [1, 4096] px"),
        ({"preprocessing": "size160"}, "but its preprocessing says uint8 [N, 160, 160, 3]"),
        ({"preprocessing": "fraction0"}, "central_fraction 0.0; it must be in (0, 1]"),
        ({"preprocessing": "std0"}, "std above 0"),
        ({"preprocessing": "{}"}, "invalid lastlayer.preprocessing metadata"),
    ],
    ids=[
        "str",
        "dict",
        "ints",
        "deep",
        "fewer",
        "more",
        "size0",
        "size100000",
        "size160",
        "fraction0",
        "std0",
        "empty",
    ],
)
def test_a_model_that_disagrees_with_itself_is_one_line_everywhere(graph, tmp_path, capsys, meta, needle):
    changes = {"size0": {"size": 0}, "size100000": {"size": 100_000}, "size160": {"size": 160},
               "fraction0": {"central_fraction": 0.0}, "std0": {"std": [0, 1, 1]}}  # fmt: skip
    if meta.get("preprocessing") in changes:
        meta = preprocessing(graph, **changes[meta["preprocessing"]])
    bad = tampered(graph, tmp_path, "bad", **meta)
    image = tmp_path / "a.jpg"
    image.write_bytes(shape_jpeg("circle"))
    with pytest.raises(ModelError, match=re.escape(needle)):
        RetrainedModel.load(str(bad))
    assert main(["label", f"--graph={bad}", str(image)]) == 1
    assert needle in one_line(capsys.readouterr().err)
    assert main(["serve", f"--graph={bad}", "--port=0"]) == 1  # the server does not start
    assert needle in one_line(capsys.readouterr().err)


def test_a_graph_that_fails_to_run_is_a_model_error(graph, tmp_path, capsys):
    bad = failing_graph(graph, tmp_path)
    image = tmp_path / "a.jpg"
    image.write_bytes(shape_jpeg("circle"))
    assert main(["label", f"--graph={bad}", str(image)]) == 1
    assert f"{bad} fails to run:" in one_line(capsys.readouterr().err)
    assert main(["serve", f"--graph={bad}", "--port=0"]) == 1
    assert "fails to run" in one_line(capsys.readouterr().err)


# --- only regular files are read -----------------------------------------------------------------


def special_files(folder: Path) -> None:
    """A FIFO and a link to /dev/zero named as images, and links to folders that loop or leave."""
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink("..", folder / "loop")
    os.symlink(".", folder / "self")
    os.symlink("/", folder / "root")


def test_retrain_skips_special_files_and_never_follows_links_out_of_the_image_folder(tmp_path, model_dir):
    data = make_dataset(tmp_path / "data", per_class=8)
    special_files(data / "Red Circles")
    os.symlink("/proc", data / "proc")  # a class folder that is a link: not a class folder
    done = lastlayer_child(*retrain_argv(tmp_path, data, model_dir, "out"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for needle in (
        "fifo.jpg: not a regular file",
        "zero.jpg: not a regular file",
        "loop: a link back to a folder above it or already listed (a loop)",
        "self: a link back to a folder above it or already listed (a loop)",
        "root: a link out of the image folder (to /)",
    ):
        assert needle in done.stderr, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "g.summary.json").read_text())
    assert summary["images"]["found"] == 24 and len(summary["labels"]) == 3


def test_label_never_opens_a_fifo_or_reads_a_device_as_a_model_or_an_image(graph, tmp_path):
    special_files(tmp_path)
    for bad in ("fifo.jpg", "zero.jpg"):
        done = lastlayer_child("label", f"--graph={tmp_path / bad}", str(tmp_path / bad), timeout=60)
        assert "not a regular file" in one_line_error(done)
    good = tmp_path / "good.jpg"
    good.write_bytes(shape_jpeg("circle"))
    images = [str(tmp_path / "fifo.jpg"), str(tmp_path / "zero.jpg"), str(good)]
    done = lastlayer_child("label", f"--graph={graph}", *images)
    assert done.returncode == 1, done.stderr  # some images were skipped: the others are labelled
    assert done.stderr.count("not a regular file") == 2 and "red circles" in done.stdout


def test_a_cache_part_replaced_by_a_fifo_or_a_device_link_is_reported_removed_and_recomputed(
    tmp_path, model_dir
):
    data = make_dataset(tmp_path / "data", per_class=8)
    assert main(retrain_argv(tmp_path, data, model_dir, "first")) == 0
    (cache,) = (tmp_path / "bottlenecks").iterdir()  # one folder per feature network
    split_into_parts(cache, 2)
    first, second = sorted(cache.glob("part-*.parquet"))
    first.unlink()
    os.mkfifo(first)
    second.unlink()
    os.symlink("/dev/zero", second)
    done = lastlayer_child(*retrain_argv(tmp_path, data, model_dir, "again"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("damaged bottleneck cache file") == 2, done.stderr[-3000:]
    assert not first.exists() and not second.is_symlink()
    summary = json.loads((tmp_path / "again" / "g.summary.json").read_text())
    assert summary["images"]["used"] == 24


def test_an_options_file_that_is_a_fifo_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "poets.json")
    started = time.monotonic()
    done = lastlayer_child("job", "deploy", str(tmp_path / "poets.json"), f"--state_dir={tmp_path / 's'}")
    assert "poets.json: the options file is a FIFO, not a regular file" in one_line_error(done)
    assert time.monotonic() - started < 30


# --- careless numbers and names ------------------------------------------------------------------


def options_file(tmp: Path, **worker: object) -> Path:
    """A job options file whose worker group is ``worker``."""
    path = job_options(tmp, "http://127.0.0.1:9/tiny.zip")
    spec = json.loads(path.read_text())
    spec["worker"].update(worker)
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    ("worker", "needle"),
    [
        ({"count": 100_000}, "worker.count: must be <= 1024, got 100000"),
        (
            {"count": 1000, "mem": 65536},
            "the tasks ask for 65,536,000 MiB of memory (worker.count x worker.mem)",
        ),
    ],
    ids=["count", "memory"],
)
def test_a_job_this_machine_cannot_run_is_refused_before_anything_starts(tmp_path, capsys, worker, needle):
    state = tmp_path / "state"
    assert main(["job", "deploy", str(options_file(tmp_path, **worker)), f"--state_dir={state}"]) == 2
    captured = capsys.readouterr()
    assert needle in one_line(captured.err) and not captured.out
    assert not state.exists()


def test_steps_that_fail_alike_are_reported_once_with_a_count():
    plan = new_plan({"worker": 1000})
    for i, step in enumerate(plan.steps):
        step.status = ERROR
        step.message = "cannot download the archive" if i else "killed: out of memory"
    assert plan.reasons() == [
        "worker-0: killed: out of memory",
        "worker-1 and 998 more steps: cannot download the archive",
    ]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["label", "--graph=", "x.jpg"], "--graph='': must not be empty"),
        (["label", "--graph=m.onnx", ""], "--image=['']: must not be empty"),
        (["serve", "--graph="], "--graph=['']: must not be empty"),
        (["serve", "--allowed_host= "], "--allowed_host=[' ']: must not be empty"),
        (["serve", "--host="], "--host='': must not be empty"),
    ],
    ids=[
        "label-graph",
        "label-image",
        "serve-graph",
        "serve-allowed-host",
        "serve-host",
    ],
)
def test_an_empty_name_is_refused_naming_its_flag(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in one_line(capsys.readouterr().err)
