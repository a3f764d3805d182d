"""Events files from lastlayer.training.tensorboard, read back with TensorBoard's own readers."""

from __future__ import annotations

import math
import os
import struct

import pytest
from tensorboard.backend.event_processing import (
    event_file_loader,
    plugin_event_multiplexer,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from lastlayer import storage
from lastlayer.training.tensorboard import (
    FILE_VERSION,
    SummaryWriter,
    crc32c,
    encode_event,
    encode_value,
    masked_crc32c,
    tfrecord,
)

TRAIN = {"accuracy": [0.5, 0.75, 0.875], "cross_entropy": [2.0, 1.25, 0.5]}
VALIDATION = {"accuracy": [0.25, 0.5, 0.625]}
STEPS = [0, 10, 20]


def _write_runs(root: str) -> None:
    for run, series in (("train", TRAIN), ("validation", VALIDATION)):
        with SummaryWriter(os.path.join(root, run)) as writer:
            for i, step in enumerate(STEPS):
                for tag, values in series.items():
                    writer.scalar(tag, values[i], step)


def _event_files(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith("events.out.tfevents.")]


# --- crc32c and framing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"a", 0xC1D04330),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4: 32 bytes of zeros
        (b"\xff" * 32, 0x62A8AB43),  # RFC 3720 B.4: 32 bytes of ones
        (bytes(range(32)), 0x46DD794E),  # RFC 3720 B.4: incrementing bytes
    ],
    ids=["empty", "a", "123456789", "zeros32", "ones32", "incrementing32"],
)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_masked_crc_matches_tensorboard() -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked

    for data in (b"", b"123456789", bytes(range(256)) * 3):
        assert masked_crc32c(data) == tb_masked(data)


def test_tfrecord_framing() -> None:
    record = tfrecord(b"hello")
    (length,) = struct.unpack("<Q", record[:8])
    assert length == 5
    assert struct.unpack("<I", record[8:12])[0] == masked_crc32c(record[:8])
    assert record[12:17] == b"hello"
    assert struct.unpack("<I", record[17:])[0] == masked_crc32c(b"hello")


def test_event_encoding_parses_with_protobuf() -> None:
    event = event_pb2.Event.FromString(
        encode_event(1234.5, -3, summary_values=[encode_value("ä/loss", 0.25), encode_value("x", 1e39)])
    )
    assert event.wall_time == 1234.5
    assert event.step == -3
    assert [v.tag for v in event.summary.value] == ["ä/loss", "x"]
    assert event.summary.value[0].simple_value == 0.25
    assert event.summary.value[1].simple_value == math.inf  # beyond float32 saturates
    version = event_pb2.Event.FromString(encode_event(1.0, file_version=FILE_VERSION))
    assert version.file_version == "brain.Event:2"
    big = event_pb2.Event.FromString(encode_event(0.0, 2**40 + 7))
    assert big.step == 2**40 + 7


# --- files, read back by TensorBoard ----------------------------------------------------------------


def test_event_accumulator_reads_train_and_validation(tmp_path) -> None:
    _write_runs(str(tmp_path))
    for run, series in (("train", TRAIN), ("validation", VALIDATION)):
        folder = tmp_path / run
        (name,) = _event_files(str(folder))
        assert name.split(".")[-1] == str(os.getpid())
        acc = EventAccumulator(str(folder))
        acc.Reload()
        assert sorted(acc.Tags()["scalars"]) == sorted(series)
        for tag, values in series.items():
            events = acc.Scalars(tag)
            assert [e.step for e in events] == STEPS
            assert [e.value for e in events] == pytest.approx(values)
    assert not [n for n in os.listdir(tmp_path / "train") if n.startswith(storage.TEMP_PREFIX)]


def test_first_record_is_file_version(tmp_path) -> None:
    with SummaryWriter(str(tmp_path)) as writer:
        writer.scalar("loss", 1.0, 1, wall_time=100.0)
    (name,) = _event_files(str(tmp_path))
    loader = event_file_loader.EventFileLoader(str(tmp_path / name))
    events = list(loader.Load())
    assert events[0].file_version == FILE_VERSION
    assert events[1].wall_time == 100.0
    assert events[1].step == 1
    assert events[1].summary.value[0].tag == "loss"


def test_multiplexer_sees_both_runs(tmp_path) -> None:
    _write_runs(str(tmp_path))
    mux = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    runs = mux.Runs()
    assert sorted(runs) == ["train", "validation"]
    assert sorted(runs["train"]["scalars"]) == ["accuracy", "cross_entropy"]
    assert [e.value for e in mux.Scalars("validation", "accuracy")] == pytest.approx(VALIDATION["accuracy"])


def test_plugin_multiplexer_sees_both_runs(tmp_path) -> None:
    """The multiplexer the TensorBoard server uses (scalars migrate to tensors)."""
    _write_runs(str(tmp_path))
    mux = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    assert sorted(mux.Runs()) == ["train", "validation"]
    tags = mux.PluginRunToTagToContent("scalars")
    assert sorted(tags["train"]) == ["accuracy", "cross_entropy"]
    assert sorted(tags["validation"]) == ["accuracy"]
    events = mux.Tensors("train", "cross_entropy")
    assert [e.step for e in events] == STEPS
    values = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    assert values == pytest.approx(TRAIN["cross_entropy"])


# --- flushing --------------------------------------------------------------------------------------


def test_nothing_written_before_first_flush(tmp_path) -> None:
    writer = SummaryWriter(str(tmp_path / "run"), flush_seconds=3600)
    writer.scalar("loss", 1.0, 1)
    assert not (tmp_path / "run").exists()
    writer.flush()
    assert len(_event_files(str(tmp_path / "run"))) == 1


def test_no_file_without_scalars(tmp_path) -> None:
    with SummaryWriter(str(tmp_path / "run")):
        pass
    assert not (tmp_path / "run").exists()


def test_scalar_flushes_after_flush_seconds(tmp_path) -> None:
    writer = SummaryWriter(str(tmp_path), flush_seconds=0.0)
    writer.scalar("loss", 1.0, 1)
    (name,) = _event_files(str(tmp_path))
    acc = EventAccumulator(str(tmp_path / name))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [1.0]


def test_live_reader_sees_points_added_by_later_flushes(tmp_path) -> None:
    """Each rewrite extends the previous bytes, so a reader resuming at its offset keeps up."""
    writer = SummaryWriter(str(tmp_path), flush_seconds=3600)
    writer.scalar("loss", 3.0, 1)
    writer.flush()
    path = tmp_path / _event_files(str(tmp_path))[0]
    first = path.read_bytes()
    loader = event_file_loader.EventFileLoader(str(path))
    assert [e.step for e in loader.Load() if e.HasField("summary")] == [1]
    writer.scalar("loss", 2.0, 2)
    writer.scalar("loss", 1.0, 3)
    writer.close()
    assert path.read_bytes().startswith(first)
    assert [e.step for e in loader.Load() if e.HasField("summary")] == [2, 3]


def test_context_manager_flushes_when_the_block_raises(tmp_path) -> None:
    with pytest.raises(RuntimeError), SummaryWriter(str(tmp_path), flush_seconds=3600) as writer:
        writer.scalar("loss", 1.0, 1)
        raise RuntimeError("training failed")
    assert len(_event_files(str(tmp_path))) == 1


def test_fsspec_memory_url() -> None:
    url = "memory://lastlayer-summaries-test/run"
    with SummaryWriter(url) as writer:
        writer.scalar("accuracy", 0.5, 7)
    data = storage.read_bytes(writer.path)
    records = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        records.append(data[offset + 12 : offset + 12 + length])
        offset += 16 + length
    assert offset == len(data)
    events = [event_pb2.Event.FromString(r) for r in records]
    assert events[0].file_version == FILE_VERSION
    assert events[1].step == 7
    assert events[1].summary.value[0].simple_value == 0.5
    fs, path = storage.url_to_fs(url)
    fs.rm(path, recursive=True)
