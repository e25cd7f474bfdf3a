"""anim_jax.convert.torch_writer: torch.save-format state dicts written without torch.

torch itself is the reference: torch.load(weights_only=True) must read every dtype bit-exact, our
data.pkl must be byte-identical to torch.save's for the same tensors, records are 64-byte aligned
(torch.load(mmap=True) works), and writing never imports torch.
"""

from __future__ import annotations

import collections
import pickletools
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from anim_jax.convert import torch_writer
from anim_jax.convert.readers import open_checkpoint, read_checkpoint
from anim_jax.convert.torch_writer import save_torch_state_dict


def sample_state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    return {
        "conv.weight": conv,
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "half": rng.standard_normal((5, 7)).astype(np.float16),
        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "double": rng.standard_normal(6),
        "long": rng.integers(-(2**40), 2**40, 9),
        "int": rng.integers(-100, 100, (2, 2)).astype(np.int32),
        "short": np.arange(-3, 3, dtype=np.int16),
        "char": np.arange(-3, 3, dtype=np.int8),
        "byte": np.arange(250, 256, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "complex": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "transposed": conv.reshape(8, 27).T,  # a non-contiguous view: stored contiguous
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "pe": np.sin(np.arange(32, dtype=np.float32))[None, :, None].repeat(3, axis=2),
    }


def as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_bit_exact(got: np.ndarray, want: np.ndarray, key: str):
    want = np.array(want, dtype=want.dtype.newbyteorder("="), order="C")
    assert got.shape == want.shape and got.dtype == want.dtype, (key, got.shape, got.dtype, want.shape, want.dtype)
    assert got.tobytes() == want.tobytes(), key


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_loads_every_dtype_bit_exact(tmp_path, mmap):
    sd = sample_state_dict()
    save_torch_state_dict(tmp_path / "sd.pth", sd)
    loaded = torch.load(tmp_path / "sd.pth", weights_only=True, mmap=mmap)
    assert type(loaded) is collections.OrderedDict and list(loaded) == list(sd)  # order kept
    for key, value in sd.items():
        t = loaded[key]
        assert not t.requires_grad and t.is_contiguous() and t.storage_offset() == 0
        assert_bit_exact(as_numpy(t), value, key)


def test_our_reader_round_trip(tmp_path):
    sd = sample_state_dict()
    save_torch_state_dict(tmp_path / "sd.pth", sd)
    for key, value in read_checkpoint(tmp_path / "sd.pth").items():
        assert_bit_exact(value, sd[key], key)
    with open_checkpoint(tmp_path / "sd.pth") as reader:
        assert [(k, reader.shape(k)) for k in reader] == [(k, v.shape) for k, v in sd.items()]


def test_same_bytes_as_torch_save(tmp_path):
    """data.pkl is byte-identical to torch.save's, and so is every storage record."""
    sd = {k: v for k, v in sample_state_dict().items() if k not in ("transposed", "big_endian")}
    torch_sd = collections.OrderedDict()
    for k, v in sd.items():
        t = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == ml_dtypes.bfloat16 else torch.from_numpy(v)
        torch_sd[k] = torch.empty(t.shape, dtype=t.dtype).copy_(t)  # canonical strides (from_numpy: 0 when empty)
    torch.save(torch_sd, tmp_path / "theirs.pth")
    save_torch_state_dict(tmp_path / "ours.pth", sd)
    theirs, ours = zipfile.ZipFile(tmp_path / "theirs.pth"), zipfile.ZipFile(tmp_path / "ours.pth")
    assert ours.read("archive/data.pkl") == theirs.read("theirs/data.pkl")
    for n in range(len(sd)):
        assert ours.read(f"archive/data/{n}") == theirs.read(f"theirs/data/{n}")
    for record in ("version", "byteorder", ".format_version", ".storage_alignment"):
        assert ours.read(f"archive/{record}") == theirs.read(f"theirs/{record}")


def _data_offsets(path) -> dict[str, int]:
    """Where each record's data starts, from the local headers (name and extra lengths)."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            assert header[:4] == b"PK\x03\x04"
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            out[info.filename] = info.header_offset + 30 + name_len + extra_len
            assert info.compress_type == zipfile.ZIP_STORED
    return out


def test_layout_alignment_and_globals(tmp_path):
    sd = sample_state_dict()
    save_torch_state_dict(tmp_path / "sd.pth", sd)
    offsets = _data_offsets(tmp_path / "sd.pth")
    names = list(offsets)
    assert names[:4] == ["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment", "archive/byteorder"]
    assert names[4:-1] == [f"archive/data/{n}" for n in range(len(sd))] and names[-1] == "archive/version"
    for n in range(len(sd)):
        assert offsets[f"archive/data/{n}"] % 64 == 0
    with zipfile.ZipFile(tmp_path / "sd.pth") as zf:
        pkl = zf.read("archive/data.pkl")
        assert zf.testzip() is None  # CRCs
    ops = list(pickletools.genops(pkl))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 2
    globals_ = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert globals_ == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage",
                        "torch HalfStorage", "torch BFloat16Storage", "torch DoubleStorage", "torch LongStorage",
                        "torch IntStorage", "torch ShortStorage", "torch CharStorage", "torch ByteStorage",
                        "torch BoolStorage", "torch ComplexFloatStorage"}  # fmt: skip


def test_zip64_records(tmp_path, monkeypatch):
    """Records of 1 GiB and more carry zip64 headers; shown here on small ones by lowering the limit."""
    monkeypatch.setattr(torch_writer, "_ZIP64_FROM", 0)
    sd = sample_state_dict()
    save_torch_state_dict(tmp_path / "sd.pth", sd)
    with zipfile.ZipFile(tmp_path / "sd.pth") as zf:
        assert zf.testzip() is None
    assert all(o % 64 == 0 for name, o in _data_offsets(tmp_path / "sd.pth").items() if "/data/" in name)
    loaded = torch.load(tmp_path / "sd.pth", weights_only=True)
    for key, value in sd.items():
        assert_bit_exact(as_numpy(loaded[key]), value, key)


class Lazy:
    """An array announced by shape and dtype, produced only when written."""

    def __init__(self, value, log, key):
        self.value, self.log, self.key = value, log, key
        self.shape, self.dtype = value.shape, value.dtype

    def __array__(self, dtype=None, copy=None):
        self.log.append(self.key)
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_lazy_values_are_read_once_in_order(tmp_path):
    log, written = [], []
    sd = {f"t{i}": np.full((3, i + 1), i, np.float32) for i in range(5)}
    save_torch_state_dict(tmp_path / "sd.pth", {k: Lazy(v, log, k) for k, v in sd.items()},
                          on_tensor=lambda key, n: written.append((key, n)))
    assert log == list(sd) and written == [(k, v.nbytes) for k, v in sd.items()]
    loaded = torch.load(tmp_path / "sd.pth", weights_only=True)
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in sd.items())


def test_failed_write_is_atomic(tmp_path):
    path = tmp_path / "sd.pth"
    save_torch_state_dict(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()
    broken = Lazy(np.ones(4, np.float32), [], "b")
    broken.value = OSError("disk went away")
    with pytest.raises(OSError, match="disk went away"):
        save_torch_state_dict(path, {"a": np.zeros(3, np.float32), "b": broken})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sd.pth"]
    changed = Lazy(np.ones(4, np.float32), [], "c")
    changed.shape = (5,)
    with pytest.raises(ValueError, match="'c' changed"):
        save_torch_state_dict(tmp_path / "new.pth", {"c": changed})
    assert [p.name for p in tmp_path.iterdir()] == ["sd.pth"]


def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype"):
        save_torch_state_dict("unused.pth", {"s": np.array(["text"])})
    with pytest.raises(TypeError, match="keys"):
        save_torch_state_dict("unused.pth", {3: np.ones(1)})


def test_writing_does_not_import_torch(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from anim_jax.convert.torch_writer import save_torch_state_dict\n"
        f"save_torch_state_dict({str(tmp_path / 'sd.pth')!r}, {{'w': np.arange(6, dtype=np.float32).reshape(2, 3)}})\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch.equal(torch.load(tmp_path / "sd.pth", weights_only=True)["w"], torch.arange(6.0).reshape(2, 3))
