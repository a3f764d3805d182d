"""`lastlayer serve`: a real uvicorn server on 127.0.0.1 answering the Open Inference Protocol and
:classify, batching across clients, bounding requests, and its page in a real browser."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from browser import WAIT_S, chrome, console_errors, full_page_screenshot
from helpers import jpeg_bytes, serving, shape_image
from lastlayer import pipeline, serve
from lastlayer.cli import main
from lastlayer.model.inference import Answer, RetrainedModel
from lastlayer.settings.options import ServeOptions
from lastlayer.settings.run import CacheConfig, OutputConfig, TrainingConfig

#: Seconds a test waits for a server to start or stop, and for one request.
START_S = 60
REQUEST_S = 30


@pytest.fixture(scope="module")
def graph(tmp_path_factory, shapes_dir, model_dir) -> Path:
    out = tmp_path_factory.mktemp("served")
    pipeline.retrain(
        str(shapes_dir),
        training=TrainingConfig(how_many_training_steps=40, random_seed=2),
        cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(out / "bottlenecks")),
        outputs=OutputConfig(
            output_graph=str(out / "shapes.onnx"),
            output_labels=str(out / "labels.txt"),
            summaries_dir=str(out / "summaries"),
            report=False,
        ),
    )
    return out / "shapes.onnx"


@pytest.fixture(scope="module")
def models(graph):
    return serve.load_models([str(graph)], 0, None)


@contextlib.contextmanager
def running(models, **settings) -> Iterator[str]:
    """``lastlayer serve``'s uvicorn server in a thread on a free port of 127.0.0.1; yields its URL."""
    sock = serve.listen("127.0.0.1", 0)
    server = serve.server(models, ServeOptions(**settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(START_S)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def url(models) -> Iterator[str]:
    with running(models, max_pixels=1_000_000, max_request_bytes=2_000_000) as base:
        yield base


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=REQUEST_S) as c:
        yield c


def shape_jpeg(kind: str, seed: int = 0) -> bytes:
    return jpeg_bytes(shape_image(kind, np.random.default_rng(seed)))


def test_health_and_metadata(url, client):
    assert client.get(f"{url}/v2/health/live").json() == {"live": True}
    assert client.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert client.get(f"{url}/v2").json()["name"] == "lastlayer"
    assert client.get(f"{url}/v1/models").json() == {"models": ["shapes"]}
    meta = client.get(f"{url}/v2/models/shapes").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]
    assert meta["outputs"] == [
        {"name": "final_result", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
        {"name": "unknown", "datatype": "BOOL", "shape": [-1]},
    ]
    assert meta["parameters"]["labels"] == ["red circles", "blue squares", "green stripes"]
    unknown = meta["parameters"]["unknown"]
    assert unknown["label"] == "unknown" and unknown["output"] == "ood_score" and unknown["threshold"] > 0
    assert client.get(f"{url}/v2/models/shapes/ready").json() == {"name": "shapes", "ready": True}


def test_classify_returns_the_top_labels(url, client):
    reply = client.post(f"{url}/v1/models/shapes:classify", content=shape_jpeg("square"))
    assert reply.status_code == 200
    labels = reply.json()["labels"]
    assert labels[0]["label"] == "blue squares" and len(labels) == 3
    assert [x["score"] for x in labels] == sorted((x["score"] for x in labels), reverse=True)
    assert abs(sum(x["score"] for x in labels) - 1) < 1e-4
    two = client.post(f"{url}/v1/models/shapes:classify?top_k=2", content=shape_jpeg("stripes")).json()
    assert [x["label"] for x in two["labels"]][:1] == ["green stripes"] and len(two["labels"]) == 2
    assert two["answer"] == "green stripes" and two["unknown"] is False and two["ood_score"] > 0


def test_a_multi_label_model_answers_the_labels_over_their_thresholds(
    tmp_path, shapes_dir, model_dir, client
):
    rows = [
        f"{d.name}/{p.name},{d.name}{';curvy' * (d.name != 'blue_squares')}"
        for d in sorted(shapes_dir.iterdir())
        for p in sorted(d.iterdir())
    ]
    (tmp_path / "l.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    pipeline.retrain(
        str(shapes_dir),
        training=TrainingConfig(
            how_many_training_steps=200, random_seed=2, labels_file=str(tmp_path / "l.csv"), multi_label=True
        ),
        cache=CacheConfig(model_dir=str(model_dir), bottleneck_dir=str(tmp_path / "bottlenecks")),
        outputs=OutputConfig(
            output_graph=str(tmp_path / "multi.onnx"),
            output_labels=str(tmp_path / "labels.txt"),
            summaries_dir=str(tmp_path / "summaries"),
            report=False,
        ),
    )
    with running(serve.load_models([str(tmp_path / "multi.onnx")], 0, None)) as base:
        circle = client.post(f"{base}/v1/models/multi:classify", content=shape_jpeg("circle")).json()
        square = client.post(f"{base}/v1/models/multi:classify", content=shape_jpeg("square")).json()
    assert sorted(circle["answer"]) == ["curvy", "red circles"], circle
    assert [x["label"] for x in circle["labels"]] == circle["answer"]
    assert square["answer"] == ["blue squares"], square


def _checkerboard() -> bytes:
    """A JPEG of none of the shapes' classes."""
    board = np.kron((np.indices((8, 8)).sum(axis=0) % 2) * 255, np.ones((28, 28))).astype(np.uint8)
    return jpeg_bytes(Image.fromarray(board).convert("RGB"))


def test_an_image_of_none_of_the_classes_is_unknown_and_still_scored(url, client, models):
    photo = _checkerboard()
    reply = client.post(f"{url}/v1/models/shapes:classify", content=photo).json()
    threshold = models["shapes"].info.unknown.threshold
    assert reply["unknown"] is True and reply["answer"] == "unknown" and reply["ood_score"] > threshold
    assert len(reply["labels"]) == 3 and abs(sum(x["score"] for x in reply["labels"]) - 1) < 1e-4
    (image,) = models["shapes"].prepare(photo)
    request = {"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                           "data": image.ravel().tolist()}]}  # fmt: skip
    outputs = client.post(f"{url}/v2/models/shapes/infer", json=request).json()["outputs"]
    assert [o["name"] for o in outputs] == ["final_result", "ood_score", "unknown"]
    assert outputs[2] == {"name": "unknown", "datatype": "BOOL", "shape": [1], "data": [True]}
    assert outputs[1]["data"][0] == pytest.approx(reply["ood_score"], rel=1e-5)


def _truncated() -> bytes:
    data = shape_jpeg("circle")
    return data[: len(data) // 3]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "the request body is empty"),
        (b"hello, not an image", "cannot decode: UnidentifiedImageError"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not an image this server can read"),
        (_truncated(), "not an image this server can read"),
        (b"GIF89a" + b"\x00" * 20, "not an image this server can read"),
    ],
)
def test_a_bad_image_is_a_400_with_the_reason(url, client, body, needle):
    reply = client.post(f"{url}/v1/models/shapes:classify", content=body)
    assert reply.status_code == 400 and needle in reply.json()["error"], reply.text


def test_image_pixels_and_request_size_are_bounded(url, client):
    buf = io.BytesIO()
    Image.new("L", (1100, 1000)).save(buf, "PNG")  # small file, 1.1 M pixels
    reply = client.post(f"{url}/v1/models/shapes:classify", content=buf.getvalue())
    assert reply.status_code == 400
    assert "1100x1000 = 1,100,000 px, more than --max_pixels=1,000,000" in reply.json()["error"]
    big = b"\xff" * 3_000_000
    reply = client.post(f"{url}/v1/models/shapes:classify", content=big)
    assert reply.status_code == 413 and "--max_request_bytes=2,000,000" in reply.json()["error"]
    chunked = client.post(
        f"{url}/v1/models/shapes:classify", content=iter([big[:1_500_000], big[1_500_000:]])
    )
    assert chunked.status_code == 413 and "--max_request_bytes=2,000,000" in chunked.json()["error"]


def test_unknown_models_paths_and_methods_are_json_errors(url, client):
    reply = client.post(f"{url}/v1/models/nope:classify", content=shape_jpeg("circle"))
    assert reply.status_code == 404 and reply.json() == {
        "error": "no model named 'nope'; this server has: shapes"
    }
    assert client.get(f"{url}/v2/models/nope").status_code == 404
    reply = client.get(f"{url}/v3/x")
    assert reply.status_code == 404 and "no such path /v3/x" in reply.json()["error"]
    assert client.get(f"{url}/v1/models/shapes:classify").status_code == 405
    assert client.post(f"{url}/v1/models/shapes:classify?top_k=0", content=b"x").status_code == 400


def test_v2_infer_matches_the_model_run_locally(url, client, models):
    model = models["shapes"]
    images = [model.prepare(shape_jpeg(kind, 3)) for kind in ("circle", "square")]
    request = {
        "id": "r1",
        "inputs": [
            {
                "name": "image",
                "shape": [2, 224, 224, 3],
                "datatype": "UINT8",
                "data": np.stack(images).ravel().tolist(),
            }
        ],
        "outputs": [{"name": "final_result"}],
    }
    reply = client.post(f"{url}/v2/models/shapes/infer", json=request)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    (out,) = body["outputs"]
    assert body["id"] == "r1" and out["name"] == "final_result" and out["shape"] == [2, 3]
    expected = model.probabilities(images)
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), expected, atol=1e-5)
    encoded = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(shape_jpeg("circle", 3)).decode()],
            }
        ]
    }
    reply = client.post(f"{url}/v2/models/shapes/infer", json=encoded)
    np.testing.assert_allclose(reply.json()["outputs"][0]["data"], expected[0], atol=1e-5)


def _tensor(**changes):
    tensor = {"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [0] * (224 * 224 * 3)}
    return {"inputs": [{**tensor, **changes}]}


@pytest.mark.parametrize(
    ("request_body", "needle"),
    [
        ("{not json", "the request is not JSON"),
        ({"inputs": "x"}, 'a JSON object with an "inputs" list'),
        (_tensor(name="input_1"), "the input is named 'input_1'"),
        (_tensor(shape=[1, 32, 32, 3]), "must be [N, 224, 224, 3]"),
        (_tensor(data=[0, 1]), "2 values for shape"),
        (_tensor(data=[300] * (224 * 224 * 3)), "values must be in [0, 255]"),
        (_tensor(data=[[0, "a"]]), "whole numbers"),
        (_tensor(datatype="FP32"), "datatype 'FP32'"),
        (_tensor(shape=[1], datatype="BYTES", data=["%%%"]), "not base64"),
        (_tensor(shape=[1], datatype="BYTES", data=[base64.b64encode(b"junk").decode()]), "not an image"),
        (_tensor(shape=[300, 224, 224, 3]), "300 images in one request, more than --max_queue=256"),
        ({**_tensor(), "outputs": [{"name": "logits"}]}, "no output 'logits'"),
    ],
)
def test_a_bad_v2_request_is_a_400_with_the_reason(url, client, request_body, needle):
    content = request_body if isinstance(request_body, str) else json.dumps(request_body)
    reply = client.post(f"{url}/v2/models/shapes/infer", content=content)
    assert reply.status_code == 400 and needle in reply.json()["error"], reply.text


def _stats(client, url) -> dict:
    return client.get(f"{url}/v2/models/shapes/stats").json()["model_stats"][0]


def test_requests_of_concurrent_clients_share_network_calls(models):
    jpegs = [shape_jpeg(kind, i) for i in range(4) for kind in ("circle", "square")]
    with running(models, max_wait_ms=500, max_batch=8) as base, httpx.Client(timeout=REQUEST_S) as client:
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(lambda b: client.post(f"{base}/v1/models/shapes:classify", content=b), jpegs)
            )
        assert all(r.status_code == 200 for r in replies)
        stats = _stats(client, base)
    assert stats["inference_count"] == 8 and stats["execution_count"] <= 3, stats


def test_a_full_queue_is_a_503_naming_the_bound(models):
    jpeg = shape_jpeg("circle")
    with (
        running(models, max_queue=1, max_batch=1, max_wait_ms=0) as base,
        httpx.Client(timeout=REQUEST_S) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        replies = list(
            pool.map(lambda _: client.post(f"{base}/v1/models/shapes:classify", content=jpeg), range(32))
        )
    codes = {r.status_code for r in replies}
    assert codes <= {200, 503} and 200 in codes and 503 in codes, codes
    assert all("--max_queue=1" in r.json()["error"] for r in replies if r.status_code == 503)


def test_a_body_that_does_not_arrive_is_a_408(models):
    with running(models, request_timeout=1.0) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=REQUEST_S) as sock:
            sock.sendall(
                b"POST /v1/models/shapes:classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n"
            )
            start = time.monotonic()
            answer = ""
            while not answer.endswith("}"):  # headers and body may come in separate packets
                chunk = sock.recv(4096).decode()
                assert chunk, answer
                answer += chunk
    assert answer.startswith("HTTP/1.1 408") and "--request_timeout=1 s" in answer
    assert time.monotonic() - start < 10


def test_the_command_serves_until_interrupted(graph, tmp_path):
    argv = [sys.executable, "-m", "lastlayer", "serve", f"--graph=shapes2={graph}", "--port=0"]
    with serving(argv, timeout=START_S) as server, httpx.Client(timeout=REQUEST_S) as client:
        reply = client.post(f"{server.base}/v1/models/shapes2:classify", content=shape_jpeg("stripes"))
        assert reply.json()["labels"][0]["label"] == "green stripes"
        assert server.interrupt() in (0, 130)
    assert f"{server.base}/v1/models/shapes2:classify" in server.text
    assert "Application shutdown complete" in server.text


def test_command_line_mistakes_are_one_line_errors(graph, capsys):
    assert main(["serve", f"--graph={graph}", f"--graph={graph}", "--port=0"]) == 2
    assert "two models are named 'shapes': name them apart with --graph=NAME=URL" in capsys.readouterr().err
    assert main(["serve", "--graph=/nonexistent/m.onnx"]) == 1
    assert "cannot read /nonexistent/m.onnx" in capsys.readouterr().err
    assert main(["serve", "--port=70000"]) == 2
    assert "--port=70000: must be <= 65535" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", f"--graph={graph}", f"--port={taken.getsockname()[1]}"]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


@pytest.mark.browser
def test_the_page_labels_a_chosen_and_a_dropped_image(models, tmp_path):
    square = tmp_path / "square.jpg"
    square.write_bytes(shape_jpeg("square"))
    with running(models) as base, chrome(1000, 800) as driver:
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(driver, WAIT_S)
        driver.get(f"{base}/")
        wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "ready")
        assert f"{base}/v1/models/shapes:classify" in driver.find_element("id", "curl").text
        driver.find_element("id", "file").send_keys(str(square))
        wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "done")
        labels = driver.find_elements("css selector", "#labels li .label")
        assert labels[0].text == "blue squares" and len(labels) == 3
        assert (
            driver.execute_script(
                "const i = document.getElementById('preview'); return i.complete && i.naturalWidth"
            )
            > 0
        )
        assert not console_errors(driver)
        full_page_screenshot(driver, tmp_path / "page.png")
        assert driver.find_element("id", "unknown").text == ""
        for data, state in (
            (_checkerboard(), "done"),
            (shape_jpeg("circle", 9), "done"),
            (b"not an image", "error"),
        ):
            driver.execute_script("document.body.dataset.state = 'ready'")
            _drop(driver, data)
            wait.until(lambda d, s=state: d.find_element("tag name", "body").get_attribute("data-state") == s)
            if data == _checkerboard():  # none of the classes: said above the scores, which still show
                assert driver.find_element("id", "unknown").text.startswith(
                    "unknown: none of the model's classes"
                )
                assert len(driver.find_elements("css selector", "#labels li .label")) == 3
            elif state == "done":
                assert driver.find_element("css selector", "#labels li .label").text == "red circles"
                assert driver.find_element("id", "unknown").text == ""
        assert "not an image this server can read" in driver.find_element("id", "error").text
    assert (tmp_path / "page.png").stat().st_size > 10_000


def _drop(driver, data: bytes) -> None:
    """Drop a file holding ``data`` on the page's drop zone, as a person dragging it there would."""
    driver.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        const zone = document.getElementById("drop");
        for (const type of ["dragover", "drop"]) {
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
        """,
        base64.b64encode(data).decode(),
    )


class _StandIn:
    """A model whose network call takes 50 ms and fails on an all-255 image (batcher unit tests)."""

    def answers(self, inputs):
        time.sleep(0.05)
        if any(x.min() == 255 for x in inputs):
            raise RuntimeError("network failed")
        return [Answer(np.full(2, x[0, 0, 0], np.float32)) for x in inputs]


def test_the_batcher_survives_a_failed_batch_and_stopping_fails_what_waits():
    from lastlayer.serve.batcher import Batcher, Busy

    async def scenario():
        batcher = Batcher(_StandIn(), max_batch=4, max_wait=0.01, max_queue=8)
        batcher.start()
        bad = np.full((2, 2, 3), 255, np.uint8)
        with pytest.raises(RuntimeError, match="network failed"):
            await batcher.submit(bad)
        rows = await asyncio.gather(*(batcher.submit(np.full((2, 2, 3), v, np.uint8)) for v in (1, 2, 3)))
        assert [r.probabilities[0] for r in rows] == [1, 2, 3] and batcher.stats.batches == 1
        waiting = [asyncio.ensure_future(batcher.submit(np.zeros((2, 2, 3), np.uint8))) for _ in range(6)]
        await asyncio.sleep(0.03)  # a batch of 4 is in the network, 2 images wait
        await batcher.stop()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(o, Busy) for o in outcomes) and not batcher.running

    asyncio.run(asyncio.wait_for(scenario(), REQUEST_S))


def test_a_batch_waits_only_for_images_on_their_way():
    from lastlayer.serve.batcher import Batcher

    async def scenario():
        batcher = Batcher(_StandIn(), max_batch=8, max_wait=5.0, max_queue=8)
        batcher.start()
        start = time.monotonic()
        await batcher.submit(np.ones((2, 2, 3), np.uint8))  # nothing announced: no wait
        assert time.monotonic() - start < 2.5 and batcher.stats.batches == 1
        first = batcher.submit(np.ones((2, 2, 3), np.uint8))
        with batcher.announced():  # a second image is decoded while the first waits
            await asyncio.sleep(0.05)
        second = batcher.submit(np.ones((2, 2, 3), np.uint8))
        await asyncio.gather(first, second)
        assert batcher.stats.batches == 2 and batcher.stats.images == 3  # the two shared one call
        start = time.monotonic()
        with batcher.announced():  # announced, then never sent (a bad image): the wait ends with it
            lone = batcher.submit(np.ones((2, 2, 3), np.uint8))
            await asyncio.sleep(0.05)
        await lone
        assert time.monotonic() - start < 2.5 and batcher.stats.batches == 3
        await batcher.stop()

    asyncio.run(asyncio.wait_for(scenario(), REQUEST_S))


SPINNING = "session.intra_op.allow_spinning"


def test_served_models_do_not_spin_wait_between_network_calls(models, graph):
    (served,) = models.values()
    assert served.session.get_session_options().get_session_config_entry(SPINNING) == "0"
    default = RetrainedModel.load(
        str(graph)
    ).session.get_session_options()  # lastlayer label's: onnxruntime's
    with pytest.raises(RuntimeError, match="does not have configuration"):
        default.get_session_config_entry(SPINNING)
