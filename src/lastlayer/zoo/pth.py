"""Read PyTorch ``.pth`` state dicts with numpy, without torch and without running arbitrary pickles.

Both of torch's serialization formats are read:

* the legacy format (torch < 1.6): a sequence of pickles (magic number, protocol version, system
  info, the main pickle, the list of storage keys) followed, for each key, by an int64 element count
  and the raw little-endian data;
* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` plus one ``<prefix>/data/<key>`` entry per
  storage.

The main pickle is read by a restricted unpickler that admits only ``collections.OrderedDict``, the
tensor rebuild functions of ``torch._utils`` and the typed ``torch.*Storage`` classes; any other
global raises :class:`~lastlayer.errors.ModelError` naming it. Tensors become C-contiguous numpy
arrays built from their storage, offset, size and stride.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lastlayer.errors import ModelError

#: The first pickle of a legacy ``.pth`` file.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
#: Most bytes of tensor data a weights file may hold (the shipped ones hold under 40 MB).
MAX_STATE_DICT_BYTES = 1 << 30

#: Storage class name -> little-endian numpy dtype of its elements.
STORAGE_DTYPES: Mapping[str, str] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


class _Storage:
    """A storage named by a persistent id; ``array`` is filled once its bytes have been read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.array: np.ndarray | None = None


@dataclass(frozen=True)
class _View:
    """A slice of a root storage (legacy ``view_metadata``), in elements."""

    root: _Storage
    offset: int
    numel: int


@dataclass(frozen=True)
class _TensorSpec:
    """Where a tensor's elements live; turned into an array after all storages are read."""

    storage: _Storage | _View
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _TensorSpec:
    if not isinstance(storage, _Storage | _View):
        raise ModelError(f"tensor without a storage in the pickle (got {type(storage).__name__})")
    try:
        return _TensorSpec(
            storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(f"malformed tensor record in the pickle: {exc}") from exc


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


_ALLOWED: Mapping[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a plain state dict needs."""

    def __init__(self, file: io.BytesIO, persistent: Callable[[Any], Any] | None) -> None:
        super().__init__(file)
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ModelError(
                f"refused global {module}.{name} in the weights pickle: only tensors, storages and "
                "OrderedDicts are read (the file is not a plain state dict, or it is not safe to load)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise ModelError(f"unexpected persistent id {pid!r} in the weights pickle")
        return self._persistent(pid)


def _unpickle(file: io.BytesIO, persistent: Callable[[Any], Any] | None = None) -> Any:
    try:
        return _RestrictedUnpickler(file, persistent).load()
    except ModelError:
        raise
    except Exception as exc:  # a corrupt pickle raises many types
        raise ModelError(f"cannot read the weights pickle: {exc.__class__.__name__}: {exc}") from exc


def _storage_type(value: Any) -> _StorageType:
    if not isinstance(value, _StorageType):
        raise ModelError(f"unsupported storage type {value!r} in the weights pickle")
    return value


def read_state_dict(data: bytes) -> dict[str, np.ndarray]:
    """Parse a ``.pth`` file (legacy or zip format) into ``{name: array}``.

    Non-tensor entries of the top-level mapping are dropped; a checkpoint that wraps its weights
    under ``"state_dict"`` is unwrapped.

    Raises:
        ModelError: the bytes are not a torch state dict, are truncated, or reference a refused global.
    """
    budget = _Budget()
    obj = _read_zip(data, budget) if data[:4] == b"PK\x03\x04" else _read_legacy(data, budget)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelError(f"the weights file holds a {type(obj).__name__}, not a state dict")
    out = {str(k): _materialize(v, budget) for k, v in obj.items() if isinstance(v, _TensorSpec)}
    if not out:
        raise ModelError("the weights file holds no tensors")
    return out


def _read_legacy(data: bytes, budget: _Budget) -> Any:
    file = io.BytesIO(data)
    if _unpickle(file) != LEGACY_MAGIC:
        raise ModelError("not a PyTorch weights file (neither the zip format nor the legacy magic number)")
    protocol = _unpickle(file)
    if protocol != LEGACY_PROTOCOL:
        raise ModelError(
            f"unsupported legacy PyTorch protocol version {protocol!r} (expected {LEGACY_PROTOCOL})"
        )
    sys_info = _unpickle(file)
    if not isinstance(sys_info, Mapping) or not sys_info.get("little_endian", False):
        raise ModelError("big-endian PyTorch weights files are not supported")
    storages: dict[str, _Storage] = {}

    def persistent(pid: Any) -> _Storage | _View:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise ModelError(f"unsupported persistent id {pid!r} in the weights pickle")
        _, kind, key, _location, numel, view = pid
        root = storages.setdefault(str(key), _Storage(str(key), _storage_type(kind).dtype, int(numel)))
        if view is None:
            return root
        _view_key, offset, view_numel = view
        return _View(root, int(offset), int(view_numel))

    obj = _unpickle(file, persistent)
    keys = _unpickle(file)
    if not isinstance(keys, list):
        raise ModelError("malformed legacy PyTorch file: no storage key list after the main pickle")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise ModelError(f"malformed legacy PyTorch file: storage {key!r} is not referenced")
        header = file.read(8)
        if len(header) != 8:
            raise ModelError(f"truncated PyTorch file: storage {key!r} is missing")
        (count,) = struct.unpack("<q", header)
        budget.spend(storage.numel * storage.dtype.itemsize, f"storage {key!r}")
        if count != storage.numel:
            raise ModelError(f"storage {key!r} holds {count} elements, the pickle says {storage.numel}")
        storage.array = _frombuffer(file.read(count * storage.dtype.itemsize), storage, key)
    return obj


def _read_zip(data: bytes, budget: _Budget) -> Any:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise ModelError("the zip file has no <prefix>/data.pkl: not a PyTorch weights file")
        prefix = pkl[: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in names and archive.read(order).strip() != b"little":
            raise ModelError("big-endian PyTorch weights files are not supported")
        storages: dict[str, _Storage] = {}

        def persistent(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise ModelError(f"unsupported persistent id {pid!r} in the weights pickle")
            _, kind, key, _location, numel = pid
            key = str(key)
            if key not in storages:
                dtype = _storage_type(kind).dtype
                storage = _Storage(key, dtype, int(numel))
                member = archive.getinfo(f"{prefix}data/{key}")
                budget.spend(member.file_size, f"storage {key!r}")  # before inflating it
                raw = archive.read(member)
                storage.array = _frombuffer(raw, storage, key)
                storages[key] = storage
            return storages[key]

        return _unpickle(io.BytesIO(archive.read(pkl)), persistent)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelError(f"cannot read the PyTorch zip file: {exc}") from exc


class _Budget:
    """Bytes of tensor data read and made so far, at most :data:`MAX_STATE_DICT_BYTES` in all."""

    def __init__(self) -> None:
        self.spent = 0

    def spend(self, nbytes: int, what: str) -> int:
        """Count ``nbytes`` for ``what``; return them. Raises ModelError past the budget."""
        self.spent += max(nbytes, 0)
        if nbytes < 0 or self.spent > MAX_STATE_DICT_BYTES:
            raise ModelError(
                f"{what} would take the weights past {MAX_STATE_DICT_BYTES:,} bytes of tensor data "
                "(the shipped weights hold under 40 MB): not a plain state dict"
            )
        return nbytes


def _frombuffer(raw: bytes, storage: _Storage, key: str) -> np.ndarray:
    if len(raw) != storage.numel * storage.dtype.itemsize:
        raise ModelError(f"truncated PyTorch file: storage {key!r} is short of data")
    return np.frombuffer(raw, dtype=storage.dtype, count=storage.numel)


def _materialize(spec: _TensorSpec, budget: _Budget) -> np.ndarray:
    """The C-contiguous native-endian array a tensor spec describes, bounds-checked."""
    if isinstance(spec.storage, _View):
        root, base, numel = spec.storage.root, spec.storage.offset, spec.storage.numel
    else:
        root, base, numel = spec.storage, 0, spec.storage.numel
    if root.array is None:
        raise ModelError(f"storage {root.key!r} is referenced but its data is missing")
    if (
        len(spec.size) != len(spec.stride)
        or min((*spec.size, *spec.stride, spec.offset, base), default=0) < 0
    ):
        raise ModelError(f"malformed tensor: size {spec.size}, stride {spec.stride}, offset {spec.offset}")
    if base + numel > root.numel:
        raise ModelError(f"storage view of {root.key!r} runs past its end")
    count = math.prod(spec.size)
    if count > numel:
        raise ModelError(
            f"tensor of size {spec.size} (stride {spec.stride}) has {count} elements but its storage "
            f"{root.key!r} holds {numel}: overlapping views are not a plain state dict"
        )
    budget.spend(count * root.dtype.itemsize, f"tensor of size {spec.size}")
    if 0 in spec.size:
        return np.zeros(spec.size, dtype=root.dtype.newbyteorder("="))
    last = spec.offset + sum((n - 1) * s for n, s in zip(spec.size, spec.stride, strict=True))
    if last >= numel:
        raise ModelError(f"tensor of size {spec.size} runs past the end of storage {root.key!r}")
    flat = root.array[base + spec.offset : base + last + 1]
    item = root.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat, shape=spec.size, strides=[s * item for s in spec.stride], writeable=False
    )
    return np.array(view, dtype=root.dtype.newbyteorder("="), order="C")
