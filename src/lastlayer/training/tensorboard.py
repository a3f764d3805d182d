"""TensorBoard scalar summaries without TensorFlow, tensorboardX or protobuf.

An events file is a sequence of TFRecords, each holding one serialized ``Event`` protobuf. Only the
few fields that scalars need are encoded here, by hand:

* ``Event``: ``wall_time`` (double, 1), ``step`` (int64, 2), ``file_version`` (string, 3),
  ``summary`` (``Summary``, 5);
* ``Summary``: repeated ``Value value`` (1);
* ``Summary.Value``: ``tag`` (string, 1), ``simple_value`` (float, 2).

A TFRecord is ``uint64 length``, ``masked crc32c(length)``, ``data``, ``masked crc32c(data)``, all
little-endian. The first record of a file is an ``Event`` whose ``file_version`` is
``brain.Event:2``.

:class:`SummaryWriter` keeps the records in memory and rewrites the whole file atomically on each
flush (HDFS and object stores have no cheap append; the files are small). Each rewrite only appends
to the bytes of the previous one, so a TensorBoard that reopens the file by path and resumes at its
last offset (the TensorFlow-free reader does; with TensorFlow installed, start TensorBoard with
``--detect_file_replacement``) sees the new points.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from lastlayer import storage

#: The logger name its lines always had (``lastlayer.summaries``), whatever the module's name.
log = logging.getLogger("lastlayer.summaries")

FILE_VERSION = "brain.Event:2"

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TFRecord uses it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C stored in TFRecord framing."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """Frame ``data`` as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# --- protobuf wire format (only what the messages above need) -------------------------------------

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    """Base-128 varint; a negative int64 is encoded as its 64-bit two's complement."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite but beyond float32: saturate as a float32 cast would
        return struct.pack("<f", math.copysign(math.inf, value))


def encode_value(tag: str, simple_value: float) -> bytes:
    """Serialize a ``Summary.Value`` with a ``simple_value``."""
    return _bytes_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) + _float32(float(simple_value))


def encode_event(
    wall_time: float,
    step: int = 0,
    *,
    file_version: str | None = None,
    summary_values: list[bytes] | None = None,
) -> bytes:
    """Serialize an ``Event``; ``summary_values`` are encoded ``Summary.Value`` messages."""
    out = _key(1, _FIXED64) + struct.pack("<d", float(wall_time))
    if step:
        out += _key(2, _VARINT) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode("utf-8"))
    if summary_values is not None:
        out += _bytes_field(5, b"".join(_bytes_field(1, value) for value in summary_values))
    return out


def events_file_name(wall_time: float | None = None) -> str:
    """``events.out.tfevents.<int time>.<hostname>.<pid>``, the name TensorBoard looks for."""
    stamp = int(time.time() if wall_time is None else wall_time)
    return f"events.out.tfevents.{stamp}.{socket.gethostname()}.{os.getpid()}"


class SummaryWriter:
    """Scalars for one run folder (e.g. ``<summaries_dir>/train``), as TensorBoard reads them.

    Records accumulate in memory. :meth:`scalar` flushes once ``flush_seconds`` have passed since
    the last flush (or since construction); :meth:`flush` and :meth:`close` rewrite the whole file
    atomically through :func:`lastlayer.storage.write_atomic`. Nothing is written before the first
    flush that has a scalar to write, so a run that fails early leaves no file at all. Used as a
    context manager, the writer flushes on exit, also when the block raises (then a failed write
    is logged and the block's own exception propagates).
    """

    def __init__(
        self,
        logdir: str,
        storage_options: Mapping[str, Any] | None = None,
        flush_seconds: float = 30.0,
    ) -> None:
        now = time.time()
        self.logdir = logdir
        self.storage_options = storage_options
        self.flush_seconds = flush_seconds
        self.path = storage.join(logdir, events_file_name(now))
        self._data = bytearray(tfrecord(encode_event(now, file_version=FILE_VERSION)))
        self._written = 0  # length of self._data at the last flush; 0: nothing written yet
        self._has_scalars = False
        self._last_flush = time.monotonic()

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        """Record ``value`` for ``tag`` at ``step``; flush if ``flush_seconds`` have passed."""
        event = encode_event(
            time.time() if wall_time is None else wall_time,
            step,
            summary_values=[encode_value(tag, value)],
        )
        self._data += tfrecord(event)
        self._has_scalars = True
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """(Re)write the whole events file atomically; a no-op when nothing new was recorded."""
        self._last_flush = time.monotonic()
        if not self._has_scalars or len(self._data) == self._written:
            return
        storage.write_atomic(self.path, bytes(self._data), self.storage_options)
        self._written = len(self._data)

    def close(self) -> None:
        """Flush; the writer may still be used afterwards."""
        self.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # keep what was recorded before the failure, but let the failure itself propagate
            self.close()
        except Exception as flush_exc:
            log.warning("could not write the summaries to %s: %s", self.path, flush_exc)
