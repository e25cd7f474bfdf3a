"""Torch-free checkpoint readers and a safetensors writer.

Reading a checkpoint never executes code from it, and nothing here imports torch.

Formats:

* **safetensors** (``.safetensors``): parsed here directly (8-byte little-endian header length,
  JSON header, raw little-endian data), so every dtype numpy/ml_dtypes can hold is supported
  (bf16 as ``ml_dtypes.bfloat16``) and a truncated file is reported as such.
* **torch zip pickles** (``.pth`` / ``.bin`` / ``.ckpt`` written by ``torch.save`` since torch 1.6):
  ``<archive>/data.pkl`` is unpickled by :class:`_RestrictedUnpickler`, which resolves only an
  allowlist of globals (the tensor/parameter rebuild functions, the ``torch.*Storage`` classes,
  ``torch.storage.UntypedStorage`` plus the ``torch.<dtype>`` names ``_rebuild_tensor_v3`` uses,
  and ``collections.OrderedDict``), each mapped to a local stand-in rather than the torch object.
  Before unpickling, the opcode stream is checked by ``pickletools.genops`` (which only parses):
  opcodes that can build arbitrary objects (``INST``, ``OBJ``, ``NEWOBJ``, ``EXT*``, sets, out-of-band
  buffers) and any ``GLOBAL`` outside the allowlist are refused with :class:`UnsafeCheckpointError`
  before anything is constructed. ``find_class`` enforces the same allowlist again at load time
  (``STACK_GLOBAL`` names are only known then), and the stand-ins are frozen so a ``BUILD`` cannot
  alter them for later loads. Storages (``<archive>/data/<key>``) are read
  lazily, once per key, and tensor views (offset, shape, stride: transposes, slices, 0-d, empty)
  are rebuilt after a bounds check against the storage record.
* **legacy torch pickles** (``torch.save`` before 1.6, or with ``_use_new_zipfile_serialization=False``):
  a run of pickles in one file: magic number, protocol version, ``sys_info``, the object (storages as
  persistent ids ``('storage', type, key, location, numel[, view])``), the list of storage keys, then
  each storage as an 8-byte little-endian element count and its little-endian bytes. Every pickle
  goes through the same prescan and allowlist as ``data.pkl``. Opening the file reads only the
  pickles and the eight-byte counts (to index where each storage lies); storage bytes are read on
  demand. ``location`` (``"cuda:0"`` ...) is ignored: everything loads to host numpy. Files written
  on a big-endian machine and the tar-based format of the earliest torch releases are refused with
  :class:`LegacyCheckpointError`.
* **diffusers / transformers folders**: :func:`find_weights_file` picks ``<stem>.safetensors``
  before ``<stem>.bin`` (sharded ``*.index.json`` variants are understood too).

Memory: :func:`open_checkpoint` returns a lazy, read-only ``Mapping[str, np.ndarray]`` that loads
one tensor per ``__getitem__`` (a torch storage stays cached only while an array returned from it
is alive), so a converter streaming a checkpoint holds one storage at a time plus what it keeps;
:func:`read_checkpoint` holds the whole file once. :func:`write_safetensors` streams tensors through
:mod:`anim_jax.atomic` (temporary file, fsync, rename), so a crash never leaves a partial file.
"""

from __future__ import annotations

import collections
import errno
import io
import json
import math
import os
import pathlib
import pickle
import pickletools
import struct
import weakref
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from anim_jax import storage
from anim_jax.atomic import atomic_open

__all__ = [
    "CheckpointError",
    "CheckpointReadError",
    "UnsafeCheckpointError",
    "LegacyCheckpointError",
    "CheckpointReader",
    "SafetensorsReader",
    "TorchPickleReader",
    "ShardedReader",
    "detect_format",
    "find_weights_file",
    "open_checkpoint",
    "iter_checkpoint",
    "read_checkpoint",
    "read_safetensors",
    "read_torch_pickle",
    "unwrap_state_dict",
    "write_safetensors",
    "DEFAULT_WEIGHT_STEMS",
]

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------------
# Errors


class CheckpointError(Exception):
    """Base class of the errors raised when a checkpoint cannot be used."""


class CheckpointReadError(CheckpointError, ValueError):
    """The file is truncated, corrupt, or not a checkpoint format this module reads."""


class LegacyCheckpointError(CheckpointReadError):
    """An old torch checkpoint variant this module does not read (the tar-based format of the earliest
    torch releases, or a legacy file written on a big-endian machine)."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for something other than tensors and plain containers; nothing of it ran."""


# ------------------------------------------------------------------------------------------------
# dtypes

# safetensors dtype names <-> numpy dtypes (little-endian on disk).
_ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _ST_DTYPES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)
_ST_NAMES: dict[np.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}

# torch legacy typed-storage classes (what torch.save writes for the classic dtypes).
_TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# torch.<dtype> globals, used by _rebuild_tensor_v3 (UntypedStorage + dtype, for newer dtypes).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _TORCH_DTYPES["float8_e8m0fnu"] = np.dtype(ml_dtypes.float8_e8m0fnu)


def _byteswapped(arr: np.ndarray) -> np.ndarray:
    """A native-order copy of ``arr`` whose elements were stored with the other byte order."""
    unit = arr.dtype.itemsize // 2 if arr.dtype.kind == "c" else arr.dtype.itemsize
    if unit <= 1:
        return arr.copy()
    uint = np.dtype(f"u{unit}")
    return np.ascontiguousarray(arr).view(uint).byteswap().view(arr.dtype)


# ------------------------------------------------------------------------------------------------
# Reader interface


class CheckpointReader(Mapping):
    """A lazy, read-only ``Mapping[str, np.ndarray]`` over one checkpoint.

    ``reader[key]`` reads that tensor from disk; ``shape(key)`` / ``dtype(key)`` / ``nbytes(key)``
    answer without reading data. Use as a context manager (or call ``close()``) to release the file.
    """

    path: pathlib.Path

    def __init__(self) -> None:
        self._keys: list[str] = []

    # Mapping protocol
    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._index():
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"

    # metadata without reading data
    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * self.dtype(key).itemsize

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # subclass hooks
    def _index(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def _load(self, key: str) -> np.ndarray:
        raise NotImplementedError


def _readinto_exact(f, buf: np.ndarray, nbytes: int, what: str) -> None:
    """Fills the 1-D uint8 array ``buf`` (``nbytes`` long) from ``f``; short reads are errors."""
    mv = memoryview(buf).cast("B") if nbytes else None
    got = 0
    chunk = 64 << 20
    while got < nbytes:
        n = f.readinto(mv[got : min(nbytes, got + chunk)])
        if not n:
            raise CheckpointReadError(f"{what}: truncated: expected {nbytes} bytes, got {got}")
        got += n


# ------------------------------------------------------------------------------------------------
# safetensors

_MAX_ST_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsReader(CheckpointReader):
    """Lazy reader of one ``.safetensors`` file; each ``reader[key]`` is a fresh writable array."""

    def __init__(self, path: PathLike):
        super().__init__()
        self.path = pathlib.Path(path)
        self._f = _open_existing(self.path)
        try:
            self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def _err(self, msg: str) -> CheckpointReadError:
        return CheckpointReadError(f"{self.path}: {msg}")

    def _parse_header(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise self._err(f"not a safetensors file: only {size} bytes (truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_ST_HEADER:
            raise self._err(f"safetensors header length {n} is implausible (corrupt file?)")
        if 8 + n > size:
            raise self._err(
                f"truncated safetensors header: header says {n} bytes, file has only {size - 8} after the length"
            )
        raw = self._f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise self._err(f"corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise self._err("corrupt safetensors header (not a JSON object)")
        self.data_start = 8 + n
        data_size = size - self.data_start
        meta = header.pop("__metadata__", None)
        if meta is not None and not (
            isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        ):
            raise self._err("corrupt safetensors header: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] | None = meta
        entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype_name = info["dtype"]
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise self._err(f"corrupt safetensors header entry for {key!r}: {info!r}") from None
            if dtype_name not in _ST_DTYPES:
                raise self._err(f"tensor {key!r} has dtype {dtype_name!r}, which this reader does not support")
            dtype = _ST_DTYPES[dtype_name]
            if not all(type(d) is int and d >= 0 for d in shape) or not all(
                type(o) is int and o >= 0 for o in (begin, end)
            ):
                raise self._err(f"corrupt safetensors header entry for {key!r}: {info!r}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise self._err(
                    f"tensor {key!r}: data_offsets {begin}..{end} do not match shape {shape} x {dtype_name}"
                )
            if end > data_size:
                raise self._err(
                    f"truncated safetensors data: tensor {key!r} ends at byte {end} of the data section, "
                    f"which has only {data_size} bytes"
                )
            entries[key] = (dtype, shape, begin, end)
        self._entries = entries
        self._keys = list(entries)

    def _index(self):
        return self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def _load(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        arr = np.empty(shape, dtype)
        if end > begin:
            self._f.seek(self.data_start + begin)
            _readinto_exact(self._f, arr.reshape(-1).view(np.uint8), end - begin, f"{self.path}: tensor {key!r}")
        return arr

    def close(self) -> None:
        self._f.close()


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file (local or a URL), in file order."""
    with storage.local_copy(path) as local, SafetensorsReader(local) as r:
        return {k: r[k] for k in r}


def _open_existing(path: pathlib.Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(path)) from None
    except IsADirectoryError:
        raise IsADirectoryError(
            errno.EISDIR, "is a directory; use find_weights_file(folder, stem) or open_checkpoint(folder)", str(path)
        ) from None


# ------------------------------------------------------------------------------------------------
# torch zip pickles: stand-ins for the allowlisted globals


class _Frozen:
    """Immutable marker objects: BUILD (``__setstate__``) and attribute writes are refused."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"refusing to set attribute {name!r} on {type(self).__name__}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"refusing to apply pickle state to {type(self).__name__}")

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _StorageType(_Frozen):
    __slots__ = ("name", "dtype", "untyped")

    def __init__(self, name: str, dtype: np.dtype, untyped: bool = False):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "untyped", untyped)

    def __repr__(self):
        return f"torch.{self.name}"


class _DType(_Frozen):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageRef(_Frozen):
    """A persistent-id reference to storage record ``key``: nothing is read until needed.

    ``numel`` elements of ``stype`` from element ``start`` (non-zero only for the storage views of
    old legacy files).
    """

    __slots__ = ("stype", "key", "numel", "start")

    def __init__(self, stype: _StorageType, key: str, numel: int, start: int = 0):
        object.__setattr__(self, "stype", stype)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "start", start)

    @property
    def nbytes(self) -> int:
        return self.numel * self.stype.dtype.itemsize

    @property
    def begin(self) -> int:
        """Byte offset of this storage inside its record."""
        return self.start * self.stype.dtype.itemsize


class _LazyTensor(_Frozen):
    """A tensor view (storage, element offset, shape, element strides) not yet read from disk."""

    __slots__ = ("storage", "dtype", "offset", "shape", "stride", "conj", "neg")

    def __init__(self, storage, dtype, offset, shape, stride, conj=False, neg=False):
        for name, value in zip(self.__slots__, (storage, dtype, offset, shape, stride, conj, neg)):
            object.__setattr__(self, name, value)

    def __repr__(self):
        return f"_LazyTensor(key={self.storage.key!r}, dtype={self.dtype}, shape={self.shape})"


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "bytes" else f"{n} bytes"
        n /= 1024
    raise AssertionError("unreachable")


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return math.inf


def _reason(e: BaseException) -> str:
    """An exception as a reason a reader can act on (``EOFError()`` has an empty message)."""
    if isinstance(e, EOFError):
        return f"the record ends early (truncated or corrupt file){f': {e}' if str(e) else ''}"
    if isinstance(e, MemoryError):
        return f"not enough memory{f' ({e})' if str(e) else ''}"
    return str(e) or type(e).__name__


def _malformed(msg: str) -> CheckpointReadError:
    # The unpickler wrapper prefixes the file name.
    return CheckpointReadError(f"malformed tensor record in the pickled object: {msg}")


def _int_tuple(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(v) is int for v in x):
        raise _malformed(f"{what} must be a tuple of ints, got {x!r}")
    return tuple(x)


def _make_lazy(storage, storage_offset, size, stride, dtype=None, metadata=None) -> _LazyTensor:
    if not isinstance(storage, _StorageRef):
        raise _malformed(f"expected a storage reference, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise _malformed(f"bad storage offset {storage_offset!r}")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _malformed(f"size {size} and stride {stride} differ in length")
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _malformed(f"negative size or stride: size {size}, stride {stride}")
    conj = neg = False
    if metadata is not None:
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise _malformed(f"unsupported tensor metadata {metadata!r}")
        conj, neg = bool(metadata.get("conj", False)), bool(metadata.get("neg", False))
    if dtype is None:
        if storage.stype.untyped:
            raise _malformed("an untyped storage needs _rebuild_tensor_v3 with a dtype")
        np_dtype = storage.stype.dtype
    else:
        np_dtype = dtype.dtype
    return _LazyTensor(storage, np_dtype, storage_offset, size, stride, conj, neg)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_lazy(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _make_lazy(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise _malformed(f"_rebuild_tensor_v3 expects a torch dtype, got {dtype!r}")
    return _make_lazy(storage, storage_offset, size, stride, dtype=dtype, metadata=metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _LazyTensor):
        raise _malformed(f"parameter data is {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # `state` holds Python attributes set on the Parameter; anything but plain data in it would
    # have needed a global, which the allowlist refuses. It is dropped.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _ordered_dict(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise _malformed(f"unexpected OrderedDict arguments {args!r}")
    return collections.OrderedDict(*args)


class _Callable(_Frozen):
    """An allowlisted callable. Wrapping the plain functions matters: a pickle can BUILD state onto
    any object it holds, and on a bare function that could rewrite ``__defaults__`` for every later
    load in the process. ``_Frozen`` refuses that."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return f"<allowlisted {self.fn.__name__}>"


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Callable(_ordered_dict),
    ("torch._utils", "_rebuild_tensor"): _Callable(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Callable(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Callable(_rebuild_parameter_with_state),
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8), untyped=True),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8), untyped=True),
}
_ALLOWED_GLOBALS.update({("torch", n): _StorageType(n, d) for n, d in _TORCH_STORAGE_DTYPES.items()})
_ALLOWED_GLOBALS.update({("torch", n): _DType(n, d) for n, d in _TORCH_DTYPES.items()})

# Opcodes allowed in a weights pickle: plain data, containers, memo, globals (checked against the
# allowlist), REDUCE/BUILD (their callables/targets can only be the stand-ins above or
# OrderedDicts), and binary persistent ids (storages). Refused: INST/OBJ/NEWOBJ(_EX)/EXT1-4 (object
# construction outside find_class's control), text PERSID, sets, PickleBuffer opcodes.
_ALLOWED_OPCODES = frozenset(
    """
    PROTO FRAME STOP MARK POP POP_MARK DUP
    INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT NONE NEWTRUE NEWFALSE
    STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS
    EMPTY_DICT DICT SETITEM SETITEMS
    GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE
    GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID
    """.split()
)


def _refusal(source, module: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{source}: refusing to load {module}.{name}: only tensors, parameters, OrderedDicts and plain "
        "Python data (dict, list, tuple, str, int, float, bool, None) are allowed in a weights file; "
        "loading this would execute or construct arbitrary code/objects. Nothing from the file was run."
    )


def _prescan(data: bytes, source, what: str = "data.pkl") -> None:
    """Refuses disallowed opcodes and globals by parsing (never executing) the pickle."""
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name not in _ALLOWED_OPCODES:
                raise UnsafeCheckpointError(
                    f"{source}: refusing to load: pickle opcode {op.name} (byte {pos} of {what}) is not allowed "
                    "in a weights file (it constructs arbitrary objects or sets). Nothing from the file was run."
                )
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in _ALLOWED_GLOBALS:
                    raise _refusal(source, module, name)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - pickletools raises ValueError and friends
        raise CheckpointReadError(f"{source}: {what} is not a valid pickle ({type(e).__name__}: {e})") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are an allowlist of local stand-ins."""

    def __init__(self, data: bytes, source):
        super().__init__(io.BytesIO(data), fix_imports=False, encoding="utf-8")
        self._source = source

    def find_class(self, module: str, name: str):
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise _refusal(self._source, module, name)
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _malformed(f"unsupported persistent id {pid!r}")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise _malformed(f"persistent id names {stype!r}, not a storage type")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise _malformed(f"bad storage persistent id {pid!r}")
        return _StorageRef(stype, key, numel)


class _LegacyUnpickler(_RestrictedUnpickler):
    """The restricted unpickler for the pickles of a legacy file.

    With ``storages`` (the object pickle) it accepts legacy storage ids and records each storage's
    type and size there; without (the header pickles) any persistent id is malformed.
    """

    def __init__(self, data: bytes, source, storages: dict | None = None):
        super().__init__(data, source)
        self._storages = storages

    def persistent_load(self, pid):
        if self._storages is None:
            raise CheckpointReadError(f"unexpected persistent id {pid!r} in a header pickle (corrupt file?)")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _malformed(f"unsupported persistent id {pid!r}")
        stype, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, _StorageType):
            raise _malformed(f"persistent id names {stype!r}, not a storage type")
        # The location ("cpu", "cuda:0", ...) only told torch where to put the storage.
        if not isinstance(key, str) or not isinstance(location, (str, bytes)) or type(numel) is not int or numel < 0:
            raise _malformed(f"bad storage persistent id {pid!r}")
        seen = self._storages.setdefault(key, (stype, numel))
        if seen != (stype, numel):
            raise _malformed(
                f"storage {key!r} is declared as {seen[1]} x {seen[0]!r} and as {numel} x {stype!r}"
            )
        if view is None:
            return _StorageRef(stype, key, numel)
        # Files from torch < 1.0 could reference a sub-range ("view") of a stored storage.
        if not (
            isinstance(view, tuple)
            and len(view) == 3
            and isinstance(view[0], str)
            and type(view[1]) is int
            and type(view[2]) is int
            and view[1] >= 0
            and view[2] >= 0
        ):
            raise _malformed(f"bad storage view {view!r} in persistent id {pid!r}")
        _, start, size = view
        if start + size > numel:
            raise _malformed(f"storage view {view!r} reaches past the {numel} elements of storage {key!r}")
        return _StorageRef(stype, key, size, start)


def _load_restricted(unpickler: _RestrictedUnpickler, source, what: str):
    """Runs ``unpickler`` (already prescanned); every failure names ``source``."""
    try:
        return unpickler.load()
    except UnsafeCheckpointError as e:
        if str(e).startswith(str(source)):
            raise
        raise UnsafeCheckpointError(f"{source}: {e}") from None
    except CheckpointReadError as e:
        raise CheckpointReadError(f"{source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any other failure means a malformed pickle
        raise CheckpointReadError(f"{source}: malformed {what} ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------
# torch checkpoints: storage access shared by the zip and legacy formats

_MAX_DATA_PKL = 1 << 30
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC = _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_PROTOCOL_VERSION = 1001


class _TorchSource:
    """An open torch checkpoint: the unpickled (lazy) object tree plus storage access.

    Subclasses say where storage record ``key`` lies (``_record_size``, ``_read_record``); reading,
    caching, bounds checks and view rebuilding are common.
    """

    path: pathlib.Path
    tree: Any
    big_endian = False

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._cache: weakref.WeakValueDictionary[str, np.ndarray] = weakref.WeakValueDictionary()

    def _record_name(self, key: str) -> str:
        raise NotImplementedError

    def _record_size(self, key: str) -> int:
        """Bytes in record ``key``; a missing record is a :class:`CheckpointReadError`."""
        raise NotImplementedError

    def _read_record(self, key: str, size: int) -> np.ndarray:
        """The ``size`` bytes of record ``key`` as a fresh uint8 array."""
        raise NotImplementedError

    def raw_storage(self, key: str, nbytes: int, cache: dict | None = None) -> np.ndarray:
        """The bytes of storage record ``key`` (uint8, at least ``nbytes`` long), read once."""
        buf = cache.get(key) if cache is not None else None
        if buf is None:
            buf = self._cache.get(key)
        if buf is None:
            size = self._record_size(key)
            if size < nbytes:
                raise CheckpointReadError(
                    f"{self.path}: storage record {self._record_name(key)!r} is {size} bytes, "
                    f"the tensor needs {nbytes}"
                )
            buf = self._read_record(key, size)
            self._cache[key] = buf
        if cache is not None:
            cache[key] = buf
        if buf.size < nbytes:
            raise CheckpointReadError(
                f"{self.path}: storage record {self._record_name(key)!r} is {buf.size} bytes, "
                f"the tensor needs {nbytes}"
            )
        return buf

    def storage_array(self, ref: _StorageRef, cache: dict | None = None) -> np.ndarray:
        raw = self.raw_storage(ref.key, ref.begin + ref.nbytes, cache)
        typed = raw[ref.begin : ref.begin + ref.nbytes].view(ref.stype.dtype)
        return _byteswapped(typed) if self.big_endian else typed

    def materialize(self, t: _LazyTensor, cache: dict | None = None) -> np.ndarray:
        ref = t.storage
        itemsize = t.dtype.itemsize
        # Counted in the tensor's dtype, which differs from the storage's for untyped storages
        # (and would for a crafted typed one): the bounds check below must use the bytes present.
        if ref.nbytes % itemsize:
            raise CheckpointReadError(
                f"{self.path}: storage {ref.key!r} has {ref.nbytes} bytes, not a multiple of {t.dtype} items"
            )
        numel = ref.nbytes // itemsize
        shape, stride, offset = t.shape, t.stride, t.offset
        if 0 in shape:
            return np.empty(shape, t.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if last >= numel:
            raise CheckpointReadError(
                f"{self.path}: tensor view (offset {offset}, shape {shape}, stride {stride}) reaches element "
                f"{last} of storage {ref.key!r}, which has only {numel}"
            )
        raw = self.raw_storage(ref.key, ref.begin + ref.nbytes, cache)
        flat = raw[ref.begin : ref.begin + ref.nbytes].view(t.dtype)
        if self.big_endian:
            flat = _byteswapped(flat)
        count = math.prod(shape)
        if _is_contiguous(shape, stride):
            out = flat[offset : offset + count].reshape(shape)
        else:
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=shape, strides=tuple(s * itemsize for s in stride), writeable=False
            )
            # Zero strides (a torch ``expand``) let a few stored bytes stand for any size: refuse a
            # copy larger than the machine's memory before trying (with memory overcommit the
            # allocation would succeed and the copy be killed), and a failed allocation.
            too_big = CheckpointReadError(
                f"{self.path}: tensor view (offset {offset}, shape {shape}, stride {stride}) of storage "
                f"{ref.key!r} ({ref.nbytes} bytes) expands to {_human_bytes(count * itemsize)}, more "
                "memory than there is"
            )
            if count * itemsize > _physical_memory():
                raise too_big
            try:
                out = np.array(view, order="C", copy=True)
            except MemoryError:
                raise too_big from None
        if t.conj:
            out = np.conj(out)
        if t.neg:
            out = np.negative(out)
        return out

    def materialize_tree(self):
        """The pickled object with every tensor read (a storage shared by views is read once)."""
        cache: dict[str, np.ndarray] = {}

        def convert(x):
            if isinstance(x, _LazyTensor):
                return self.materialize(x, cache)
            return self.storage_array(x, cache)  # a bare storage saved on its own: its 1-D data

        try:
            return _walk(self.tree, convert)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{self.path}: {e}") from None
        except RecursionError:
            raise CheckpointReadError(f"{self.path}: the pickled object nests containers too deeply") from None

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# torch zip archives


class _TorchZip(_TorchSource):
    """An open torch zip checkpoint."""

    format = "torch_zip"

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(path))
        try:
            self._zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
                raise
            raise CheckpointReadError(
                f"{path}: not a readable zip archive (truncated or corrupt torch checkpoint?): {e}"
            ) from None
        try:
            self._open()
        except BaseException:
            self._zf.close()
            raise

    def _open(self) -> None:
        names = self._zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            if "data.pkl" in names:
                pkls = ["data.pkl"]
            else:
                raise CheckpointReadError(
                    f"{self.path}: zip archive has no data.pkl: not a torch.save checkpoint (or it is truncated)"
                )
        if len(pkls) > 1:
            raise CheckpointReadError(f"{self.path}: zip archive has several data.pkl records: {pkls}")
        self.prefix = pkls[0][: -len("data.pkl")]
        if any(n.startswith(self.prefix + "code/") for n in names) or self.prefix + "constants.pkl" in names:
            raise CheckpointReadError(
                f"{self.path}: this is a TorchScript archive (torch.jit.save), not a torch.save state dict"
            )
        byteorder = b"little"
        if self.prefix + "byteorder" in names:
            byteorder = self._read_small(self.prefix + "byteorder").strip()
            if byteorder not in (b"little", b"big"):
                raise CheckpointReadError(f"{self.path}: unknown byteorder record {byteorder!r}")
        self.big_endian = byteorder == b"big"
        info = self._zf.getinfo(pkls[0])
        if info.file_size > _MAX_DATA_PKL:
            raise CheckpointReadError(f"{self.path}: data.pkl is {info.file_size} bytes, implausibly large")
        data = self._read_small(pkls[0])
        _prescan(data, self.path)
        self.tree = _load_restricted(_RestrictedUnpickler(data, self.path), self.path, "data.pkl")

    def _read_small(self, name: str) -> bytes:
        try:
            return self._zf.read(name)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise CheckpointReadError(f"{self.path}: cannot read record {name!r}: {_reason(e)}") from None

    def _record_name(self, key: str) -> str:
        return f"{self.prefix}data/{key}"

    def _record_size(self, key: str) -> int:
        name = self._record_name(key)
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise CheckpointReadError(f"{self.path}: storage record {name!r} is missing") from None
        # torch stores records uncompressed: a size past the end of the file is a lie, refused
        # before anything of that size is allocated or read.
        file_size = self.path.stat().st_size
        if info.compress_type == zipfile.ZIP_STORED and info.header_offset + info.file_size > file_size:
            raise CheckpointReadError(
                f"{self.path}: storage record {name!r} claims {info.file_size} bytes ({_human_bytes(info.file_size)}) "
                f"but the file has only {file_size} bytes (truncated or corrupt)"
            )
        return info.file_size

    def _read_record(self, key: str, size: int) -> np.ndarray:
        name = self._record_name(key)
        try:
            buf = np.empty(size, np.uint8)
            with self._zf.open(name) as f:
                _readinto_exact(f, buf, size, f"{self.path}: storage record {name!r}")
        except CheckpointReadError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, MemoryError) as e:
            raise CheckpointReadError(f"{self.path}: cannot read storage record {name!r}: {_reason(e)}") from None
        return buf

    def close(self) -> None:
        self._zf.close()


# ------------------------------------------------------------------------------------------------
# legacy torch files (torch.save before 1.6, or _use_new_zipfile_serialization=False)


class _BoundedReader:
    """What ``pickletools.genops`` needs of a file (read, readline, tell), never past ``limit``:
    a corrupt length inside a pickle cannot make it read, or allocate, more than is there."""

    def __init__(self, f, limit: int):
        self._f = f
        self._limit = limit

    def tell(self) -> int:
        return self._f.tell()

    def _left(self) -> int:
        return max(0, self._limit - self._f.tell())

    def read(self, n: int = -1) -> bytes:
        left = self._left()
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self, n: int = -1) -> bytes:
        left = self._left()
        return self._f.readline(left if n is None or n < 0 else min(n, left))


class _TorchLegacy(_TorchSource):
    """An open legacy torch file: the pickles are read at once, storage bytes on demand.

    Storage records follow the pickles in the order of the pickled key list, each an int64 element
    count and the data. The counts are read at open (one seek per storage) to index every record.
    """

    format = "torch_legacy"

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        self._f = _open_existing(path)
        try:
            self._size = os.fstat(self._f.fileno()).st_size
            self._open()
        except BaseException:
            self._f.close()
            raise

    def _next_pickle(self, what: str) -> bytes:
        """The bytes of the pickle starting at the current position (parsed, not executed)."""
        start = self._f.tell()
        try:
            for _ in pickletools.genops(_BoundedReader(self._f, min(self._size, start + _MAX_DATA_PKL))):
                pass
        except Exception as e:  # noqa: BLE001 - pickletools raises ValueError and friends
            raise CheckpointReadError(
                f"{self.path}: the {what} pickle (from byte {start}) is truncated or corrupt "
                f"({type(e).__name__}: {e})"
            ) from None
        end = self._f.tell()
        self._f.seek(start)
        data = self._f.read(end - start)
        if len(data) != end - start:
            raise CheckpointReadError(f"{self.path}: cannot re-read the {what} pickle (file changed?)")
        return data

    def _load_pickle(self, what: str, storages: dict | None = None):
        data = self._next_pickle(what)
        _prescan(data, self.path, f"the {what} pickle")
        return _load_restricted(_LegacyUnpickler(data, self.path, storages), self.path, f"{what} pickle")

    def _open(self) -> None:
        magic = self._load_pickle("magic number")
        if type(magic) is not int or magic != _LEGACY_MAGIC_NUMBER:
            raise CheckpointReadError(f"{self.path}: not a torch checkpoint: bad magic number {magic!r}")
        version = self._load_pickle("protocol version")
        if version != _LEGACY_PROTOCOL_VERSION:
            raise LegacyCheckpointError(
                f"{self.path}: legacy torch checkpoint with protocol version {version!r}; only "
                f"{_LEGACY_PROTOCOL_VERSION} (every torch release that wrote this format) is understood"
            )
        sys_info = self._load_pickle("sys_info")
        if not isinstance(sys_info, dict):
            raise CheckpointReadError(f"{self.path}: malformed sys_info pickle: {sys_info!r}")
        # Storage bytes are little-endian whatever the machine, but old torch wrote the element
        # counts in the machine's order; big-endian files are too rare to be worth guessing.
        if sys_info.get("little_endian", True) is not True:
            raise LegacyCheckpointError(
                f"{self.path}: legacy torch checkpoint written on a big-endian machine (sys_info {sys_info!r}); "
                "not supported. Re-save it with torch on that machine in the current format "
                "(torch.save(obj, f_new)) or as safetensors."
            )
        storages: dict[str, tuple[_StorageType, int]] = {}
        self.tree = self._load_pickle("object", storages)
        keys = self._load_pickle("storage key list")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointReadError(f"{self.path}: malformed storage key list pickle (a {type(keys).__name__})")
        self._records = self._index_records(keys, storages)

    def _index_records(self, keys: list[str], storages: dict) -> dict[str, tuple[int, int]]:
        """``key -> (byte offset, byte size)`` of each storage record, checked against the pickle."""
        records: dict[str, tuple[int, int]] = {}
        pos = self._f.tell()
        for i, key in enumerate(keys):
            if key in records:
                raise CheckpointReadError(f"{self.path}: storage key list names {key!r} twice (corrupt file?)")
            if key not in storages:
                raise CheckpointReadError(
                    f"{self.path}: storage key list names {key!r}, which the pickled object does not use "
                    "(corrupt file?)"
                )
            stype, numel = storages[key]
            self._f.seek(pos)
            head = self._f.read(8)
            if len(head) < 8:
                raise CheckpointReadError(
                    f"{self.path}: truncated: the file ends at byte {self._size}, inside the header of storage "
                    f"{key!r} ({i + 1} of {len(keys)})"
                )
            (count,) = struct.unpack("<q", head)
            if count != numel:
                raise CheckpointReadError(
                    f"{self.path}: storage {key!r} holds {count} elements on disk, the pickle says {numel} "
                    "(corrupt file?)"
                )
            begin = pos + 8
            pos = begin + count * stype.dtype.itemsize
            if pos > self._size:
                raise CheckpointReadError(
                    f"{self.path}: truncated: storage {key!r} ({i + 1} of {len(keys)}) needs bytes {begin}..{pos}, "
                    f"the file has only {self._size}"
                )
            records[key] = (begin, pos - begin)
        unstored = [k for k in storages if k not in records]
        if unstored:
            raise CheckpointReadError(
                f"{self.path}: storages {unstored[:5]} are used by the pickled object but not stored in the file "
                "(corrupt file?)"
            )
        return records

    def _record_name(self, key: str) -> str:
        return key

    def _record_size(self, key: str) -> int:
        if key not in self._records:
            raise CheckpointReadError(f"{self.path}: storage record {key!r} is missing")
        return self._records[key][1]

    def _read_record(self, key: str, size: int) -> np.ndarray:
        begin, _ = self._records[key]
        buf = np.empty(size, np.uint8)
        try:
            self._f.seek(begin)
            _readinto_exact(self._f, buf, size, f"{self.path}: storage {key!r}")
        except CheckpointReadError:
            raise
        except (OSError, ValueError) as e:
            raise CheckpointReadError(f"{self.path}: cannot read storage {key!r}: {_reason(e)}") from None
        return buf

    def close(self) -> None:
        self._f.close()


def _is_contiguous(shape, stride) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


_PLAIN = (str, int, float, bool, type(None), bytes)


def _walk(obj, convert, path="", memo=None):
    """Copies the container tree, converting ``_LazyTensor``/``_StorageRef`` leaves with ``convert``."""
    if memo is None:
        memo = {}
    if isinstance(obj, (_LazyTensor, _StorageRef)):
        return convert(obj)
    if isinstance(obj, _PLAIN) or isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, _DType):  # e.g. {"dtype": torch.float16} in a config: plain data
        return obj.dtype
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        memo[id(obj)] = out
        for k, v in obj.items():
            if not _plain_key(k):
                raise UnsafeCheckpointError(f"unexpected dict key of type {type(k).__name__} at {path or 'top level'}")
            out[k] = _walk(v, convert, f"{path}[{k!r}]", memo)
        return out
    if isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        out.extend(_walk(v, convert, f"{path}[{i}]", memo) for i, v in enumerate(obj))
        return out
    if isinstance(obj, tuple):
        out = tuple(_walk(v, convert, f"{path}[{i}]", memo) for i, v in enumerate(obj))
        memo[id(obj)] = out
        return out
    raise UnsafeCheckpointError(f"unexpected {type(obj).__name__} at {path or 'top level'}")


def _plain_key(k) -> bool:
    if isinstance(k, tuple):
        return all(_plain_key(v) for v in k)
    return isinstance(k, _PLAIN)


class TorchPickleReader(CheckpointReader):
    """Lazy reader of a ``torch.save`` checkpoint (``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``), zip or legacy.

    The mapping view is :func:`unwrap_state_dict` of the pickled object (``obj["state_dict"]``
    when present); ``tree`` is the whole pickled object with lazy tensors in it; ``format`` is
    ``"torch_zip"`` or ``"torch_legacy"``.
    """

    def __init__(self, path: PathLike):
        super().__init__()
        self.path = pathlib.Path(path)
        self._src = _open_torch(self.path)
        try:
            self._flat = _unwrap(self._src.tree, (_LazyTensor, np.ndarray), self.path)
        except BaseException:
            self._src.close()
            raise
        self._keys = list(self._flat)

    @property
    def format(self) -> str:
        return self._src.format

    @property
    def tree(self):
        return self._src.tree

    def _index(self):
        return self._flat

    def shape(self, key: str) -> tuple[int, ...]:
        return self._flat[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._flat[key].dtype

    def _load(self, key: str) -> np.ndarray:
        return self._src.materialize(self._flat[key])

    def materialize_tree(self):
        """The whole pickled object with every tensor read (shared storages are read once)."""
        return self._src.materialize_tree()

    def close(self) -> None:
        self._src.close()


def read_torch_pickle(path: PathLike) -> Any:
    """The object a ``torch.save`` file (zip or legacy format) holds, with tensors as numpy arrays.

    Only tensors/parameters, (Ordered)dicts, lists, tuples and plain scalars/strings are accepted;
    anything else raises :class:`UnsafeCheckpointError` before it is constructed.
    """
    src = _open_torch(pathlib.Path(path))
    try:
        return src.materialize_tree()
    finally:
        src.close()


def _unwrap(obj, tensor_types, source) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{source}: expected a dict of tensors, the checkpoint holds a {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointReadError(f"{source}: state-dict key {k!r} is a {type(k).__name__}, not a string")
        if not isinstance(v, tensor_types):
            raise CheckpointReadError(
                f"{source}: state-dict entry {k!r} is a {type(v).__name__}, not a tensor "
                "(expected a flat dict of tensors, optionally under a 'state_dict' key)"
            )
    return dict(obj)


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """``obj["state_dict"]`` when present (AnimateDiff/Lightning ``.ckpt``), else ``obj``; every
    value must be an array (the error names the first entry that is not)."""
    return _unwrap(obj, (np.ndarray,), source)


def _open_torch(path: pathlib.Path) -> _TorchSource:
    """The zip or legacy reader for a ``torch.save`` file; other pickles are refused unread."""
    with _open_existing(path) as f:
        head = f.read(512)
    kind = _sniff(head)
    if kind == "torch_legacy":
        return _TorchLegacy(path)
    _refuse_unreadable(path, kind)
    return _TorchZip(path)  # anything else: the zip reader says what is wrong


def _refuse_unreadable(path: pathlib.Path, kind: str) -> None:
    if kind == "legacy_tar":
        raise LegacyCheckpointError(
            f"{path}: torch checkpoint in the tar-based format of the earliest torch releases, which this "
            "reader does not support. Loading it needs torch with weights_only=False, which runs code from "
            "the file, so only for a file you trust: "
            'torch.save(torch.load(f, map_location="cpu", weights_only=False), f_new), '
            "or convert it to safetensors."
        )
    if kind == "pickle":
        raise CheckpointReadError(
            f"{path}: plain pickle file, not a torch.save checkpoint; refusing to unpickle it "
            "(save the tensors with torch.save or as safetensors)"
        )


# ------------------------------------------------------------------------------------------------
# Format detection and dispatch


def _sniff(head: bytes) -> str:
    if not head:
        return "empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch_zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "legacy_tar"  # the earliest torch releases wrote a tar archive
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]:
        return "torch_legacy"
    long1 = head.find(b"\x8a\x0a", 0, 16)  # LONG1, 10 bytes: the magic number, cut short
    if head[:1] == b"\x80" and long1 >= 0 and len(head) < long1 + 12 and _LEGACY_MAGIC.startswith(head[long1 + 2 :]):
        return "torch_legacy"
    # Before the pickle check: a safetensors header length can start with byte 0x80 too.
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head.lstrip()[:1] == b"{":
        return "index"
    return "unknown"


def detect_format(path: PathLike) -> str:
    """``"safetensors"``, ``"torch_zip"``, ``"torch_legacy"`` (``torch.save`` before 1.6),
    ``"index"`` (sharded ``*.index.json``), or raises."""
    path = pathlib.Path(path)
    with _open_existing(path) as f:
        head = f.read(512)
    kind = _sniff(head)
    if kind in ("safetensors", "torch_zip", "torch_legacy", "index"):
        if kind == "index" and not path.name.endswith(".json"):
            kind = "unknown"
        else:
            return kind
    if kind == "empty":
        raise CheckpointReadError(f"{path}: empty file (0 bytes), not a checkpoint")
    _refuse_unreadable(path, kind)
    if len(head) < 9:
        raise CheckpointReadError(f"{path}: only {len(head)} bytes: truncated or not a checkpoint")
    raise CheckpointReadError(
        f"{path}: unrecognised checkpoint format (neither a torch.save checkpoint nor safetensors); "
        f"first bytes {head[:16]!r}"
    )


DEFAULT_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def find_weights_file(folder: PathLike, stem: str | Sequence[str] = DEFAULT_WEIGHT_STEMS) -> pathlib.Path:
    """The weights file of a diffusers/transformers folder.

    Prefers ``<stem>.safetensors``, then a sharded ``<stem>.safetensors.index.json``, then
    ``<stem>.bin``, then ``<stem>.bin.index.json``; with several stems, any safetensors form wins
    over any ``.bin`` form.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, "weights folder not found", str(folder))
    stems = (stem,) if isinstance(stem, str) else tuple(stem)
    tried = []
    for suffix in _WEIGHT_SUFFIXES:
        for s in stems:
            candidate = folder / f"{s}{suffix}"
            tried.append(candidate.name)
            if candidate.is_file():
                return candidate
    present = sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin", ".json", ".pth")))
    raise FileNotFoundError(
        errno.ENOENT, f"no weights file in folder (looked for {', '.join(tried)}; found {present or 'nothing'})", str(folder)
    )


class ShardedReader(CheckpointReader):
    """Lazy reader of a sharded checkpoint described by ``*.index.json`` (``weight_map``)."""

    def __init__(self, index_path: PathLike):
        super().__init__()
        self.path = pathlib.Path(index_path)
        try:
            with _open_existing(self.path) as f:
                index = json.loads(f.read().decode("utf-8"))
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:
            raise CheckpointReadError(f"{self.path}: not a valid sharded-checkpoint index ({e})") from None
        for key, shard in weight_map.items():
            if (
                not isinstance(shard, str)
                or shard in ("", ".", "..")
                or "/" in shard
                or "\\" in shard
                or shard.endswith(".json")
            ):
                raise CheckpointReadError(f"{self.path}: bad shard name {shard!r} for {key!r}")
        self._map: dict[str, str] = dict(weight_map)
        self._keys = list(self._map)
        self._readers: dict[str, CheckpointReader] = {}

    def _reader(self, key: str) -> CheckpointReader:
        shard = self._map[key]
        if shard not in self._readers:
            r = _open_file(self.path.parent / shard)
            self._readers[shard] = r
        r = self._readers[shard]
        if key not in r:
            raise CheckpointReadError(f"{self.path}: shard {shard!r} has no tensor {key!r}")
        return r

    def _index(self):
        return self._map

    def shape(self, key):
        return self._reader(key).shape(key)

    def dtype(self, key):
        return self._reader(key).dtype(key)

    def _load(self, key):
        return self._reader(key)[key]

    def close(self):
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def _open_file(path: pathlib.Path) -> CheckpointReader:
    kind = detect_format(path)
    if kind == "safetensors":
        return SafetensorsReader(path)
    if kind in ("torch_zip", "torch_legacy"):
        return TorchPickleReader(path)
    raise CheckpointReadError(f"{path}: nested index files are not supported")


def open_checkpoint(path: PathLike, *, stem: str | Sequence[str] = DEFAULT_WEIGHT_STEMS) -> CheckpointReader:
    """A lazy ``Mapping[str, np.ndarray]`` over a checkpoint file, index, or diffusers folder.

    The format is detected from the content, not the extension. Close it (or use ``with``).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = find_weights_file(path, stem)
    elif not path.exists():
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(path))
    kind = detect_format(path)
    if kind == "index":
        return ShardedReader(path)
    return _open_file(path)


def iter_checkpoint(path: PathLike, **kw) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(key, array)`` one tensor at a time (low peak memory)."""
    with open_checkpoint(path, **kw) as reader:
        for key in reader:
            yield key, reader[key]


def read_checkpoint(path: PathLike, *, stem: str | Sequence[str] = DEFAULT_WEIGHT_STEMS) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (safetensors, torch zip or legacy pickle, sharded index, or a folder).

    As in torch, tensors that are contiguous views of one storage (tied weights, slices) come back
    as views of one buffer; other views are copied to C-contiguous arrays.
    """
    with storage.local_copy(path) as local, open_checkpoint(local, stem=stem) as reader:  # URLs: downloaded first
        cache: dict[str, np.ndarray] = {}
        if isinstance(reader, TorchPickleReader):
            # One strong cache so views sharing a storage read it once.
            return {k: reader._src.materialize(reader._flat[k], cache) for k in reader}
        return {k: reader[k] for k in reader}


# ------------------------------------------------------------------------------------------------
# Writing


def _write_array(f, arr: np.ndarray) -> None:
    """Writes ``arr``'s bytes (C order, little-endian) to ``f``."""
    if arr.size == 0:
        return
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    f.write(memoryview(data))


def write_safetensors(
    path: PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``tensors`` to ``path`` as safetensors, atomically.

    Data go to a temporary file in the same directory, which is fsynced and then renamed over
    ``path``: a crash leaves either the old file or the complete new one, and a failed write leaves
    no temporary file. Arrays (numpy, ml_dtypes bf16/fp8, or anything with ``shape``/``dtype`` that
    ``np.asarray`` accepts, e.g. jax arrays) are converted one at a time while streaming.
    """
    path = storage.as_path(path)  # a gs:// URL is staged locally and uploaded by atomic_open
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        metadata = dict(metadata)
    entries: list[tuple[str, Any, np.dtype, tuple[int, ...]]] = []
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"tensor names must be non-empty strings, got {key!r}")
        if key == "__metadata__":
            raise ValueError("'__metadata__' is reserved in safetensors and cannot name a tensor")
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            value = np.asarray(value)
        dtype = np.dtype(value.dtype).newbyteorder("<")
        if dtype not in _ST_NAMES:
            raise TypeError(f"tensor {key!r}: dtype {value.dtype} cannot be stored in safetensors")
        entries.append((key, value, dtype, tuple(int(d) for d in value.shape)))
    # Largest items first, then by name (as the reference writer does), keeping data aligned.
    entries.sort(key=lambda e: (-e[2].itemsize, e[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for key, _, dtype, shape in entries:
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)

    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for key, value, dtype, shape in entries:
            arr = np.asarray(value)
            if arr.shape != shape or arr.dtype.newbyteorder("<") != dtype:
                raise ValueError(f"tensor {key!r} changed shape/dtype while being written")
            if arr.dtype != dtype:  # big-endian input: store little-endian
                arr = arr.astype(dtype)
            _write_array(f, arr)


