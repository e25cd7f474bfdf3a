"""Writing ``torch.save``-format state dicts without torch.

``save_torch_state_dict(path, tensors)`` writes what ``torch.save(OrderedDict(tensors), path)`` writes
(the zip layout of torch >= 1.6), so ``torch.load(path, weights_only=True)`` and
``module.load_state_dict`` read it, and so does :func:`anim_jax.convert.readers.open_checkpoint`::

    archive/data.pkl            pickle protocol 2: an OrderedDict {key: tensor}; every tensor is
                                torch._utils._rebuild_tensor_v2(<storage>, 0, shape, stride, False,
                                OrderedDict()); <storage> is the persistent id
                                ("storage", torch.FloatStorage, "<n>", "cpu", numel)
    archive/.format_version     "1"
    archive/.storage_alignment  "64"
    archive/byteorder           "little"
    archive/data/<n>            the raw little-endian bytes of tensor n, 64-byte aligned in the file
                                (as torch aligns them, so torch.load(mmap=True) works too)
    archive/version             "3"

The pickle names torch globals (``GLOBAL torch._utils _rebuild_tensor_v2``, ``torch.FloatStorage``
...) that cannot be pickled by reference without importing torch, since ``pickle`` imports a global's
module to check it. :class:`_TorchPickler` therefore writes those GLOBAL opcodes itself for the
:class:`_Global` stand-ins. Everything else is the standard pickler.

Values may be numpy arrays or anything with ``shape``, ``dtype`` and ``__array__`` (e.g. a lazy
array that is read or computed only when its bytes are written): one tensor's data is in memory at a
time. The file is written through :mod:`anim_jax.atomic` (temporary name, fsync, rename): a crash
leaves either no file or the complete one.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from anim_jax import storage
from anim_jax.atomic import atomic_open

__all__ = ["save_torch_state_dict", "STORAGE_TYPES"]

# numpy dtype -> torch legacy typed-storage class (what torch.save names for these dtypes).
STORAGE_TYPES: dict[np.dtype, str] = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
    np.dtype(np.complex64): "ComplexFloatStorage",
    np.dtype(np.complex128): "ComplexDoubleStorage",
}

ALIGNMENT = 64
_LOCAL_HEADER = 30  # fixed part of a zip local file header
_ZIP64_EXTRA = 20  # the zip64 extra field zipfile appends to a local header (id, size, 2 x 8 bytes)
_PAD_ID = b"FB"  # the extra-field id torch uses for its alignment padding
# Records from this size on get zip64 headers. zipfile adds its zip64 field exactly when forced or
# when file_size * 1.05 > ZIP64_LIMIT (which implies >= 1 GiB); forcing it from 1 GiB on makes the
# decision ours, so the header length, hence the alignment padding, is known before writing.
_ZIP64_FROM = 1 << 30


class _Global:
    """A reference to ``module.name`` that is pickled as a GLOBAL opcode without importing it."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce callables to be callable
        raise TypeError(f"{self.module}.{self.name} is a pickle reference, not a function")


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {name: _Global("torch", name) for name in STORAGE_TYPES.values()}


class _Storage:
    """One ``archive/data/<key>`` record, pickled as a persistent id."""

    __slots__ = ("storage_type", "key", "numel")

    def __init__(self, storage_type: str, key: str, numel: int):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _Tensor:
    """A contiguous tensor over a whole storage, pickled as torch pickles it."""

    __slots__ = ("storage", "shape")

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        return _REBUILD_TENSOR_V2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _STORAGE_GLOBALS[obj.storage_type], obj.key, "cpu", obj.numel)
        return None

    def _save_global_reference(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_reference


def _check_entries(tensors: Mapping[str, Any]) -> list[tuple[str, Any, np.dtype, tuple[int, ...]]]:
    entries = []
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"state-dict keys must be non-empty strings, got {key!r}")
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            value = np.asarray(value)
        dtype = np.dtype(value.dtype)
        native = dtype.newbyteorder("=")
        if native not in STORAGE_TYPES:
            raise TypeError(f"tensor {key!r}: dtype {dtype} has no torch storage type here "
                            f"(supported: {sorted(str(d) for d in STORAGE_TYPES)})")
        entries.append((key, value, native, tuple(int(d) for d in value.shape)))
    return entries


def _pickle_state_dict(entries) -> bytes:
    tree = collections.OrderedDict()
    for n, (key, _, dtype, shape) in enumerate(entries):
        tree[key] = _Tensor(_Storage(STORAGE_TYPES[dtype], str(n), math.prod(shape)), shape)
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(tree)
    return buf.getvalue()


def _aligned_info(zf: zipfile.ZipFile, name: str, nbytes: int) -> tuple[zipfile.ZipInfo, bool]:
    """A STORED ZipInfo whose data will start on an ALIGNMENT boundary (padding in an extra field)."""
    info = zipfile.ZipInfo(name)  # fixed 1980-01-01 timestamp: identical inputs, identical files
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    zip64 = nbytes >= _ZIP64_FROM
    start = zf.fp.tell()
    fixed = start + _LOCAL_HEADER + len(name.encode("utf-8")) + 4 + (_ZIP64_EXTRA if zip64 else 0)
    pad = -fixed % ALIGNMENT
    info.extra = _PAD_ID + struct.pack("<H", pad) + b"Z" * pad
    return info, zip64


def _write_record(zf: zipfile.ZipFile, name: str, data: bytes | memoryview, *, align: bool = False) -> None:
    nbytes = len(data)
    if align:
        info, zip64 = _aligned_info(zf, name, nbytes)
    else:
        info, zip64 = zipfile.ZipInfo(name), False
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = nbytes
    with zf.open(info, "w", force_zip64=zip64) as f:
        if align:
            data_start = zf.fp.tell()
            if data_start % ALIGNMENT:
                raise AssertionError(f"record {name} starts at byte {data_start}, not {ALIGNMENT}-aligned")
        f.write(data)


def save_torch_state_dict(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    archive_name: str = "archive",
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Writes ``tensors`` ({key: array}) as ``torch.save(OrderedDict(tensors), path)`` would, atomically.

    Keys keep their order. Each value's bytes are taken (``np.asarray``) only when its record is
    written; big-endian arrays are stored little-endian. ``on_tensor(key, nbytes)`` is called after
    each tensor is written (progress reporting).
    """
    path = storage.as_path(path)
    if not archive_name or "/" in archive_name:
        raise ValueError(f"bad archive name {archive_name!r}")
    entries = _check_entries(tensors)
    pkl = _pickle_state_dict(entries)
    with atomic_open(path, "w+b") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            prefix = f"{archive_name}/"
            _write_record(zf, prefix + "data.pkl", pkl)
            _write_record(zf, prefix + ".format_version", b"1")
            _write_record(zf, prefix + ".storage_alignment", str(ALIGNMENT).encode())
            _write_record(zf, prefix + "byteorder", b"little")
            for n, (key, value, dtype, shape) in enumerate(entries):
                arr = np.asarray(value)
                if tuple(arr.shape) != shape or arr.dtype.newbyteorder("=") != dtype:
                    raise ValueError(
                        f"tensor {key!r} changed while being written: {arr.shape} {arr.dtype}, "
                        f"announced {shape} {dtype}"
                    )
                arr = np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<"))
                _write_record(zf, f"{prefix}data/{n}", memoryview(arr.reshape(-1).view(np.uint8)), align=True)
                if on_tensor is not None:
                    on_tensor(key, arr.nbytes)
                del arr
            _write_record(zf, prefix + "version", b"3\n")
