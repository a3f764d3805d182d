"""int8 zoo networks (built from the float graph, calibrated on images made in the package, cached), the
device choice (cpu / cuda / auto) on a machine without a GPU, and the job service's GPU workers."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
from PIL import Image

import lastlayer
from lastlayer.cli import main
from lastlayer.dataset import scan
from lastlayer.demo import demo_image_dir
from lastlayer.engines.base import Need, Task
from lastlayer.engines.local import LocalEngine
from lastlayer.errors import UsageError
from lastlayer.jobs.supervisor import gpus_of
from lastlayer.jobs.task import Server
from lastlayer.model import contract, runtime
from lastlayer.preprocess import decode, to_input
from lastlayer.settings.fields import check
from lastlayer.settings.run import EngineConfig
from lastlayer.zoo import ZOO, FeatureModel, load_feature_model, quantize, resolve
from lastlayer.zoo.catalog import INT8_SUFFIX, read_weights
from lastlayer.zoo.loader import build_network
from lastlayer.zoo.pth import read_state_dict

ROOT = Path(__file__).resolve().parents[2]
SMALL = "mobilenet_v2_1.0_128"  # the quickest network to quantize
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture(scope="module")
def pair(model_dir: Path) -> tuple[FeatureModel, FeatureModel]:
    return load_feature_model(SMALL, str(model_dir)), load_feature_model(SMALL + INT8_SUFFIX, str(model_dir))


def features(model, images: np.ndarray) -> np.ndarray:
    (out,) = model.session(1).run([contract.FEATURES], {contract.IMAGE: images})
    return out


def test_every_zoo_network_has_an_int8_version():
    floats = [name for name, entry in ZOO.items() if not entry.int8]
    assert len(floats) == 7
    for name in floats:
        int8 = ZOO[name + INT8_SUFFIX]
        assert int8.int8 and int8.weights_sha256 == ZOO[name].weights_sha256
        assert int8.preprocessing == ZOO[name].preprocessing
        assert resolve(name + INT8_SUFFIX) == (name + INT8_SUFFIX, int8, None)


def test_calibration_images_are_made_the_same_everywhere():
    prep = ZOO[SMALL].preprocessing
    images = quantize.calibration_images(prep)
    assert images.shape == (quantize.CALIBRATION_COUNT, 128, 128, 3) and images.dtype == np.uint8
    assert np.array_equal(images, quantize.calibration_images(prep))
    assert images.reshape(len(images), -1).std(axis=1).min() > 5  # no blank image among them


def test_the_int8_network_is_smaller_keeps_the_contract_and_its_features(pair):
    float_model, int8_model = pair
    proto = onnx.load_from_string(int8_model.onnx_bytes)
    assert [v.name for v in proto.graph.input] == [contract.IMAGE]
    assert [v.name for v in proto.graph.output] == [contract.FEATURES, contract.LOGITS]
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 30
    assert len(int8_model.onnx_bytes) < 0.6 * len(float_model.onnx_bytes)
    assert int8_model.key != float_model.key and int8_model.feature_size == float_model.feature_size
    assert int8_model.preprocessing == float_model.preprocessing
    prep = float_model.preprocessing
    demo = sorted(Path(demo_image_dir()).rglob("*.png"))[::10]
    photos = [skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee()]
    images = np.stack(
        [decode(p.read_bytes(), prep) for p in demo] + [to_input(Image.fromarray(x), prep) for x in photos]
    )
    f, q = features(float_model, images), features(int8_model, images)
    cosine = (f * q).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)
    assert cosine.min() > 0.85 and cosine[-3:].mean() > 0.97, cosine  # the photos: closest
    (logits,) = int8_model.session(1).run([contract.LOGITS], {contract.IMAGE: images[-3:-2]})
    assert CATS & set(np.argsort(logits[0])[-5:].tolist())  # still sees the cat in chelsea


def test_the_int8_network_is_cached_and_its_key_follows_the_quantizer(pair, model_dir, monkeypatch, caplog):
    _, int8_model = pair
    with caplog.at_level(logging.INFO, logger="lastlayer.zoo.loader"):
        again = load_feature_model(SMALL + INT8_SUFFIX, str(model_dir))
    assert again.onnx_bytes == int8_model.onnx_bytes and "built" not in caplog.text
    cached = sorted(p.name for p in model_dir.glob(f"{SMALL}{INT8_SUFFIX}-*.onnx"))
    assert cached == [f"{SMALL}{INT8_SUFFIX}-{int8_model.key[:16]}.onnx"]
    monkeypatch.setattr(quantize, "VERSION", "test")
    monkeypatch.setattr(quantize, "quantize", lambda model, prep, network: pytest.fail("built again"))
    with pytest.raises(pytest.fail.Exception, match="built again"):  # a new quantizer: a new key
        load_feature_model(SMALL + INT8_SUFFIX, str(model_dir))


def test_retrain_exports_an_int8_model_that_labels(tmp_path: Path, model_dir: Path):
    def run(out: str, **outputs):
        return lastlayer.retrain(
            "",
            architecture=SMALL,
            training=lastlayer.TrainingConfig(how_many_training_steps=50, random_seed=1),
            cache=lastlayer.CacheConfig(bottleneck_dir=str(tmp_path / "b"), model_dir=str(model_dir)),
            outputs=lastlayer.OutputConfig(
                output_graph=str(tmp_path / out / "g.onnx"),
                output_labels=str(tmp_path / out / "l.txt"),
                summaries_dir=str(tmp_path / out / "s"),
                **outputs,
            ),
        )

    plain = run("float")
    small = run("int8", quantize_output_graph=True)
    assert small.architecture == plain.architecture == SMALL  # trained on the same float features
    assert small.metrics.test_accuracy == plain.metrics.test_accuracy
    sizes = {out: (tmp_path / out / "g.onnx").stat().st_size for out in ("float", "int8")}
    assert sizes["int8"] < 0.5 * sizes["float"]
    info = contract.read_info(onnx.load(tmp_path / "int8" / "g.onnx"), "g.onnx")
    assert info.architecture == SMALL + INT8_SUFFIX
    photos = sorted(Path(demo_image_dir()).rglob("*.png"))[::8]
    truth = [p.parent.name.replace("_", " ") for p in photos]
    for out in ("float", "int8"):
        found = [
            p.top[0][0] for p in lastlayer.label(str(tmp_path / out / "g.onnx"), [str(p) for p in photos])
        ]
        assert np.mean([a == b for a, b in zip(found, truth, strict=True)]) >= 0.8, (out, found)


def test_quantize_output_graph_needs_a_zoo_network(tmp_path: Path):
    entry = ZOO[SMALL]
    user = tmp_path / "mine.onnx"
    onnx.save(build_network(entry, read_state_dict(read_weights(entry)), 128), user)  # float32 NCHW in
    with pytest.raises(UsageError, match=r"--quantize_output_graph: .*mine\.onnx is your own model"):
        lastlayer.retrain(
            "",
            architecture=str(user),
            cache=lastlayer.CacheConfig(bottleneck_dir=str(tmp_path / "b"), model_dir=str(tmp_path / "m")),
            outputs=lastlayer.OutputConfig(
                output_graph=str(tmp_path / "g.onnx"),
                output_labels=str(tmp_path / "l.txt"),
                summaries_dir=str(tmp_path / "s"),
                quantize_output_graph=True,
            ),
        )


# -- devices --------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu_here():
    runtime.gpu_problem.cache_clear()
    yield
    runtime.gpu_problem.cache_clear()


def test_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back(no_gpu_here, pair, caplog, capsys):
    assert runtime.resolve_device("cpu") == runtime.CPU
    with pytest.raises(UsageError, match=r"--device=cuda: .*CPU-only build.*lastlayer\[gpu\]"):
        runtime.resolve_device("cuda")
    with pytest.raises(UsageError, match="--device=cuda"):
        pair[0].session(1, runtime.CUDA)
    with pytest.raises(UsageError, match="--device=cuda"):
        LocalEngine(device="cuda")
    with caplog.at_level(logging.INFO, logger="lastlayer.contract"):
        assert LocalEngine(device="auto").device == runtime.CPU
    assert "--device=auto: the network runs on the CPU" in caplog.text
    assert main(["retrain", "--device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lastlayer: error: --device=cuda") and "Traceback" not in err


def test_a_cuda_provider_that_does_not_start_is_reported(no_gpu_here, monkeypatch):
    """A GPU build of onnxruntime on a machine without a GPU: the provider is listed but falls back."""
    import onnxruntime as ort

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert "CUDA provider did not start" in (runtime.gpu_problem() or "")


def test_device_flags_are_checked():
    with pytest.raises(UsageError, match="--device='tpu'"):
        check(EngineConfig(device="tpu"))
    with pytest.raises(UsageError, match="--device='cuda': must be cpu with --engine=spark"):
        check(EngineConfig(engine="spark", device="cuda"))
    with pytest.raises(UsageError, match="--gpu_batch_size=0"):
        check(EngineConfig(gpu_batch_size=0))


def test_on_a_gpu_every_thread_feeds_one_session_in_large_batches(pair, monkeypatch):
    """The GPU path's wiring, with the CPU standing in for the GPU (no GPU here): one shared session,
    ``gpu_batch_size`` images a call, the same features as the CPU path."""
    float_model, _ = pair
    monkeypatch.setattr(runtime, "resolve_device", lambda device: runtime.CUDA if device != "cpu" else "cpu")
    made, batches = [], []

    class Recording:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            batches.append(len(feeds[contract.IMAGE]))
            return self.session.run(names, feeds)

    def session(self, threads=0, device=runtime.CPU):
        made.append(device)
        return Recording(runtime.session(self.onnx_bytes, self.architecture, threads))

    monkeypatch.setattr(type(float_model), "session", session)
    images = scan(demo_image_dir(), 10, 10)
    tasks = [Task(i, f.url, f.relpath, None, False) for i, f in enumerate(images.files)]

    def need(task: Task, content: str) -> Need:
        return Need(True)

    engine = LocalEngine.from_config(EngineConfig(device="cuda", gpu_batch_size=32, num_threads=2), None, {})
    gpu = {r.task.index: r.plain for r in engine.extract(tasks, float_model, need)}
    assert made == [runtime.CUDA] and max(batches) == 32 and len(batches) == -(-len(tasks) // 32)
    made.clear()
    cpu = {r.task.index: r.plain for r in LocalEngine(2).extract(tasks, float_model, need)}
    assert set(made) == {runtime.CPU}
    assert all(np.allclose(gpu[i], cpu[i], atol=1e-5) for i in cpu)


# -- the job service's GPU workers ---------------------------------------------------------------


def test_each_gpu_worker_gets_its_own_gpus():
    assert [gpus_of(i, 1, None) for i in range(3)] == ["0", "1", "2"]
    assert [gpus_of(i, 2, None) for i in range(2)] == ["0,1", "2,3"]
    assert [gpus_of(i, 1, "3, 5") for i in range(3)] == ["3", "5", ""]  # no GPU left: --device=cuda says so


@pytest.mark.parametrize(
    ("role", "index", "expected"),
    [
        ("worker", 0, ("cpu", 0, 3)),
        ("worker", 1, ("cpu", 1, 3)),
        ("gpuworker", 0, ("cuda", 2, 3)),
    ],
)
def test_the_poets_job_gives_gpu_workers_a_shard_and_the_gpu(monkeypatch, role, index, expected):
    spec = importlib.util.spec_from_file_location("poets", ROOT / "examples" / "poets" / "poets.py")
    poets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(poets)
    seen = []
    for entry in ("retrain", "extract_shard"):  # worker 0 trains, the others compute their shards
        monkeypatch.setattr(lastlayer, entry, lambda **kwargs: seen.append(kwargs["engine"]))
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"], "gpuworker": ["127.0.0.1:3"]}
    poets.main(Server(cluster, role, index, "grpc://x"), "/tmp", {"args": {"--how_many_training_steps": 5}})
    (engine,) = seen
    assert (engine.device, engine.worker_index, engine.worker_count) == expected
