"""Torch-free checkpoint readers/writer: exact reads, refusal of code in pickles, corrupt files.

torch is used here only to MAKE files; anim_jax.convert.readers never imports it (checked in a
subprocess where ``import torch`` fails).
"""

from __future__ import annotations

import builtins
import collections
import io
import itertools
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.torch import load_file as st_load_torch
from safetensors.torch import save_file as st_save_torch

from anim_jax.convert import readers as R
from anim_jax.convert.readers import (
    CheckpointReadError,
    LegacyCheckpointError,
    UnsafeCheckpointError,
    find_weights_file,
    iter_checkpoint,
    open_checkpoint,
    read_checkpoint,
    read_safetensors,
    read_torch_pickle,
    unwrap_state_dict,
    write_safetensors,
)

_NP_OF_TORCH = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    torch.complex64: np.complex64,
    torch.uint16: np.uint16,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
}


def _bits(t: torch.Tensor) -> bytes:
    """The tensor's values as raw bytes (C order), without going through float conversion."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.view(torch.uint8)
    elif t.dtype == torch.uint16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def assert_bitexact(arr: np.ndarray, t: torch.Tensor) -> None:
    assert isinstance(arr, np.ndarray), type(arr)
    assert arr.dtype == np.dtype(_NP_OF_TORCH[t.dtype]), (arr.dtype, t.dtype)
    assert arr.shape == tuple(t.shape)
    assert np.ascontiguousarray(arr).tobytes() == _bits(t)


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    sd = collections.OrderedDict()
    sd["fp32"] = torch.randn(3, 4, generator=g)
    sd["fp16"] = torch.randn(5, generator=g).half()
    sd["bf16"] = torch.randn(2, 3, 4, generator=g).bfloat16()
    sd["fp64"] = torch.randn(3, generator=g).double()
    sd["i64"] = torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4)
    sd["i32"] = torch.tensor([1, -2, 3], dtype=torch.int32)
    sd["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 200, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(3.5)
    sd["scalar_i"] = torch.tensor(7, dtype=torch.int64)
    sd["empty"] = torch.empty(0, 3)
    sd["base"] = base
    sd["transposed"] = base.t()  # stride (1, 8), shares base's storage
    sd["slice"] = base[1:5, 2:7]  # offset 10, stride (8, 1)
    sd["row"] = base[3]  # contiguous view at an offset
    sd["strided"] = base[::2, ::3]
    sd["expanded"] = torch.randn(1, 4, generator=g).expand(3, 4)  # stride 0
    sd["param"] = torch.nn.Parameter(torch.randn(4, 2, generator=g))
    sd["param_bf16"] = torch.nn.Parameter(torch.randn(3, generator=g).bfloat16(), requires_grad=False)
    sd["nan_inf"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return sd


@pytest.fixture
def torch_file(tmp_path):
    sd = _state_dict()
    path = tmp_path / "weights.pth"
    torch.save(sd, path)
    return path, sd


# ----------------------------------------------------------------------------------------------
# torch zip pickles: exact reads


def test_torch_pickle_bitexact_all_dtypes_and_views(torch_file):
    path, sd = torch_file
    obj = read_torch_pickle(path)
    assert isinstance(obj, collections.OrderedDict)
    assert list(obj) == list(sd)
    for k, t in sd.items():
        assert_bitexact(obj[k], t)
    # read_checkpoint gives the same flat dict
    flat = read_checkpoint(path)
    assert list(flat) == list(sd)
    for k, t in sd.items():
        assert_bitexact(flat[k], t)
    # a contiguous view of a shared storage is a view of the same buffer, read once
    assert np.shares_memory(flat["row"], flat["base"])
    assert flat["transposed"].flags.c_contiguous


def test_nested_state_dict_and_plain_values(tmp_path):
    sd = _state_dict()
    path = tmp_path / "nested.ckpt"
    extra = {"lr": 1e-4, "names": ["a", "b"], "shape": (1, 2), "flag": True, "none": None, "n": 2**70}
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1200, "extra": extra}, path)
    obj = read_torch_pickle(path)
    assert obj["epoch"] == 3 and obj["global_step"] == 1200
    assert obj["extra"] == extra
    for k, t in sd.items():
        assert_bitexact(obj["state_dict"][k], t)
    flat = unwrap_state_dict(obj)
    assert list(flat) == list(sd)
    flat2 = read_checkpoint(path)  # unwraps "state_dict" itself
    for k, t in sd.items():
        assert_bitexact(flat2[k], t)


def test_module_state_dict_with_metadata_attribute(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 3), torch.nn.BatchNorm1d(3)
    )
    sd = model.state_dict()  # an OrderedDict with a `_metadata` attribute (pickled with BUILD)
    assert hasattr(sd, "_metadata")
    path = tmp_path / "model.bin"
    torch.save(sd, path)
    flat = read_checkpoint(path)
    assert list(flat) == list(sd)
    for k, t in sd.items():
        assert_bitexact(flat[k], t)


def test_newer_dtypes_untyped_storage_v3_and_protocol_4(tmp_path):
    sd = {
        "f8a": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "f8b": torch.tensor([0.25, -3.0]).to(torch.float8_e5m2),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        "bf16_t": torch.randn(3, 5).bfloat16().t(),
    }
    for proto in (2, 4):
        path = tmp_path / f"p{proto}.pth"
        torch.save(sd, path, pickle_protocol=proto)
        flat = read_checkpoint(path)
        for k, t in sd.items():
            assert_bitexact(flat[k], t)


def test_parameter_with_python_state(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.custom_attr = 5  # pickled via _rebuild_parameter_with_state
    path = tmp_path / "p.pth"
    torch.save({"p": p}, path)
    assert_bitexact(read_checkpoint(path)["p"], p)


def test_lazy_reader_and_iterator(torch_file):
    path, sd = torch_file
    with open_checkpoint(path) as r:
        assert isinstance(r, R.TorchPickleReader)
        assert list(r) == list(sd) and len(r) == len(sd)
        assert "fp32" in r and "nope" not in r
        for k, t in sd.items():
            assert r.shape(k) == tuple(t.shape)
            assert r.dtype(k) == np.dtype(_NP_OF_TORCH[t.dtype])
            assert r.nbytes(k) == t.numel() * t.element_size()
        assert_bitexact(r["slice"], sd["slice"])
        with pytest.raises(KeyError):
            r["nope"]
    got = dict(iter_checkpoint(path))
    for k, t in sd.items():
        assert_bitexact(got[k], t)


def test_content_dispatch_not_extension(tmp_path, torch_file):
    path, sd = torch_file
    disguised = tmp_path / "actually_torch.safetensors"
    disguised.write_bytes(path.read_bytes())
    assert R.detect_format(disguised) == "torch_zip"
    assert_bitexact(read_checkpoint(disguised)["bf16"], sd["bf16"])
    st = tmp_path / "actually_st.bin"
    st_save_torch({"x": torch.ones(2, 2)}, st)
    assert R.detect_format(st) == "safetensors"
    assert_bitexact(read_checkpoint(st)["x"], torch.ones(2, 2))


# ----------------------------------------------------------------------------------------------
# safetensors


def test_read_safetensors_bitexact(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {
        "fp32": torch.randn(3, 4, generator=g),
        "fp16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 5, generator=g).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.0),
        "empty": torch.empty(0, 4),
        "f8": torch.tensor([1.0, -0.5]).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "w.safetensors"
    st_save_torch(sd, path, metadata={"format": "pt"})
    got = read_safetensors(path)
    assert set(got) == set(sd)
    for k, t in sd.items():
        assert_bitexact(got[k], t)
        assert got[k].flags.writeable
    with R.SafetensorsReader(path) as r:
        assert r.metadata == {"format": "pt"}
        assert r.shape("bf16") == (2, 5) and r.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------------------------
# Refusing code


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _Custom:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", ["os.system", "exec"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol, payload):
    marker = tmp_path / "MARKER"
    evil = _RunsShell(marker) if payload == "os.system" else _RunsExec(marker)
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "evil": evil}, path, pickle_protocol=protocol)
    # sanity: the payload really is live (plain pickle would run it)
    with pytest.raises(UnsafeCheckpointError) as ei:
        read_torch_pickle(path)
    msg = str(ei.value)
    assert str(path) in msg and "refusing to load" in msg
    assert ("system" in msg) if payload == "os.system" else ("exec" in msg)
    for fn in (read_checkpoint, open_checkpoint):
        with pytest.raises(UnsafeCheckpointError):
            fn(path)
    assert not marker.exists()
    # sanity: the payload is live, an unrestricted load runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_find_class_refuses_even_without_prescan(tmp_path, monkeypatch):
    """Defence in depth: the load-time allowlist alone stops the payload."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"evil": _RunsShell(marker)}, path, pickle_protocol=4)  # STACK_GLOBAL: only known at load time
    monkeypatch.setattr(R, "_prescan", lambda data, source: None)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load (posix|nt)\.system"):
        read_torch_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, protocol",
    [
        (_Custom(), 2),
        (_Custom(), 4),
        ({1, 2}, 2),  # builtins.set global
        ({1, 2}, 4),  # EMPTY_SET / ADDITEMS opcodes
        (frozenset({1}), 4),
        (os.getcwd, 2),  # a function reference
        (complex(1, 2), 2),  # builtins.complex
        (np.zeros(2), 2),  # numpy reconstruct
    ],
)
def test_non_tensor_objects_are_refused(tmp_path, value, protocol):
    path = tmp_path / "obj.pth"
    torch.save({"w": torch.ones(1), "x": value}, path, pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        read_torch_pickle(path)


def test_build_state_onto_allowlisted_objects_is_refused(tmp_path, torch_file):
    """BUILD on an allowlisted global must not be able to poison later loads (e.g. __defaults__)."""
    state = (None, {"__defaults__": ({"neg": True},)})
    for glob in (b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n"):
        data = b"\x80\x02" + glob + pickle.dumps(state, protocol=2)[2:-1] + b"b."
        path = tmp_path / "build.pth"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", data)
        with pytest.raises(UnsafeCheckpointError, match="refusing to apply pickle state") as ei:
            read_torch_pickle(path)
        assert str(path) in str(ei.value)
    good, sd = torch_file
    assert_bitexact(read_checkpoint(good)["fp32"], sd["fp32"])  # nothing was poisoned


def test_torch_dtype_values_are_plain_data(tmp_path):
    path = tmp_path / "cfg.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "dtype": torch.float16}, path)
    obj = read_torch_pickle(path)
    assert obj["dtype"] == np.dtype(np.float16)


# Hand-built torch-layout archives for malformed-record tests.


class _Storage:
    def __init__(self, key, numel, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def _write_torch_zip(path, obj, records: dict[str, bytes], *, prefix="archive", with_pkl=True):
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        if with_pkl:
            z.writestr(f"{prefix}/data.pkl", buf.getvalue())
        z.writestr(f"{prefix}/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", "3\n")


def test_handbuilt_archive_reads(tmp_path):
    data = np.arange(12, dtype=np.float32)
    path = tmp_path / "ok.pth"
    _write_torch_zip(path, {"t": _Tensor(_Storage("0", 12), 2, (2, 3), (1, 4))}, {"0": data.tobytes()})
    got = read_checkpoint(path)["t"]
    np.testing.assert_array_equal(got, np.lib.stride_tricks.as_strided(data[2:], (2, 3), (4, 16)))


@pytest.mark.parametrize(
    "tensor, records, match",
    [
        # view reaching past the end of its storage (must not read stray memory)
        (_Tensor(_Storage("0", 12), 0, (3, 4), (100, 1)), {"0": bytes(48)}, "reaches element"),
        (_Tensor(_Storage("0", 12), 10, (4,), (1,)), {"0": bytes(48)}, "reaches element"),
        # storage record shorter than the pickle says
        (_Tensor(_Storage("0", 12), 0, (12,), (1,)), {"0": bytes(20)}, "is 20 bytes, the tensor needs 48"),
        # storage record missing
        (_Tensor(_Storage("7", 4), 0, (4,), (1,)), {"0": bytes(16)}, "missing"),
        # negative stride / mismatched lengths
        (_Tensor(_Storage("0", 12), 0, (3,), (-1,)), {"0": bytes(48)}, "negative"),
        (_Tensor(_Storage("0", 12), 0, (3, 4), (1,)), {"0": bytes(48)}, "differ in length"),
        # zero strides: 4 stored bytes standing for a 10^6 x 10^6 float32 tensor (3.6 TiB)
        (_Tensor(_Storage("0", 1), 0, (10**6, 10**6), (0, 0)), {"0": bytes(4)}, r"expands to 3.64 TiB, more memory"),
    ],
)
def test_malformed_records_are_read_errors(tmp_path, tensor, records, match):
    path = tmp_path / "bad.pth"
    _write_torch_zip(path, {"t": tensor}, records)
    with pytest.raises(CheckpointReadError, match=match) as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)


def test_storage_record_larger_than_the_file(tmp_path):
    path = tmp_path / "claims_4gib.pth"
    _write_torch_zip(path, {"t": _Tensor(_Storage("3", 4), 0, (4,), (1,))}, {"3": bytes(16)})
    data = bytearray(path.read_bytes())
    name = b"archive/data/3"
    # The name follows the local header (30 bytes, sizes at 18) and the central-directory entry
    # (46 bytes, sizes at 20); both get compressed and plain sizes of ~4 GiB.
    for sig, at, size_field in ((b"PK\x03\x04", 30, 18), (b"PK\x01\x02", 46, 20)):
        start = 0
        while (j := data.find(name, start)) >= 0:
            if data[j - at: j - at + 4] == sig:
                struct.pack_into("<II", data, j - at + size_field, 0xFFFFFF00, 0xFFFFFF00)
            start = j + 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match=r"storage record 'archive/data/3' claims 4294967040 bytes \(4 GiB\) "
                                                  r"but the file has only \d+ bytes \(truncated or corrupt\)") as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)


def test_missing_data_pkl(tmp_path):
    path = tmp_path / "nopkl.pth"
    _write_torch_zip(path, {}, {"0": bytes(4)}, with_pkl=False)
    with pytest.raises(CheckpointReadError, match="no data.pkl") as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)


# ----------------------------------------------------------------------------------------------
# Corrupt, truncated, legacy, missing


def _cut(src, dst, frac=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


def test_truncated_files(tmp_path, torch_file):
    path, _ = torch_file
    st = tmp_path / "w.safetensors"
    st_save_torch({"a": torch.randn(64, 64), "b": torch.randn(32)}, st)
    cases = [
        _cut(path, tmp_path / "half.pth"),
        _cut(path, tmp_path / "almost.pth", 0.98),
        _cut(st, tmp_path / "half.safetensors"),
        _cut(st, tmp_path / "header_cut.safetensors", 40 / st.stat().st_size),
    ]
    for bad in cases:
        with pytest.raises(CheckpointReadError) as ei:
            read_checkpoint(bad)
        assert str(bad) in str(ei.value), ei.value
    with pytest.raises(CheckpointReadError, match="truncated safetensors data"):
        read_checkpoint(tmp_path / "half.safetensors")
    with pytest.raises(CheckpointReadError, match="truncated safetensors header"):
        read_checkpoint(tmp_path / "header_cut.safetensors")


def test_corrupt_storage_bytes_detected_by_crc(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.arange(1000, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    i = data.index(np.arange(1000, dtype=np.float32)[500:502].tobytes())
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match=str(path)):
        read_checkpoint(path)


def test_random_and_empty_files(tmp_path):
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    tiny = tmp_path / "tiny.pth"
    tiny.write_bytes(b"\x01\x02")
    for p in (rnd, empty, tiny):
        with pytest.raises(CheckpointReadError) as ei:
            read_checkpoint(p)
        assert str(p) in str(ei.value)
    with pytest.raises(CheckpointReadError, match="empty"):
        read_checkpoint(empty)


def test_legacy_tar_format_and_plain_pickle_are_refused(tmp_path):
    import tarfile

    path = tmp_path / "ancient.pth"  # the earliest torch releases wrote a tar archive
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sys_info")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x80\x02N."))
    for fn in (read_checkpoint, read_torch_pickle, open_checkpoint, R.detect_format):
        with pytest.raises(LegacyCheckpointError, match="tar-based format") as ei:
            fn(path)
        assert str(path) in str(ei.value)
        assert 'map_location="cpu"' in str(ei.value)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(CheckpointReadError, match="plain pickle"):
        read_checkpoint(plain)


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.pth"
    for fn in (read_checkpoint, read_torch_pickle, read_safetensors, open_checkpoint):
        with pytest.raises(FileNotFoundError) as ei:
            fn(missing)
        assert str(missing) in str(ei.value)


# ----------------------------------------------------------------------------------------------
# Folders


def test_find_weights_file_and_folders(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "diffusion_pytorch_model.bin")
    assert find_weights_file(folder, "diffusion_pytorch_model").name == "diffusion_pytorch_model.bin"
    assert_bitexact(read_checkpoint(folder)["w"], torch.zeros(2))
    st_save_torch({"w": torch.ones(2)}, folder / "diffusion_pytorch_model.safetensors")
    assert find_weights_file(folder, "diffusion_pytorch_model").name == "diffusion_pytorch_model.safetensors"
    assert_bitexact(read_checkpoint(folder)["w"], torch.ones(2))  # safetensors preferred

    enc = tmp_path / "image_encoder"
    enc.mkdir()
    torch.save({"v": torch.ones(1)}, enc / "pytorch_model.bin")
    assert find_weights_file(enc).name == "pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="looked for model.safetensors"):
        find_weights_file(enc, "model")
    with pytest.raises(FileNotFoundError):
        find_weights_file(tmp_path / "missing_folder")


def test_sharded_index(tmp_path):
    folder = tmp_path / "te"
    folder.mkdir()
    st_save_torch({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    torch.save({"b": torch.full((3,), 2.0)}, folder / "model-00002-of-00002.safetensors")  # torch zip shard
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    got = read_checkpoint(folder)
    assert list(got) == ["a", "b"]
    assert_bitexact(got["b"], torch.full((3,), 2.0))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointReadError, match="bad shard name"):
        read_checkpoint(folder)


def test_unwrap_state_dict():
    a = np.ones(2, np.float32)
    assert unwrap_state_dict({"a": a})["a"] is a
    assert list(unwrap_state_dict({"state_dict": {"a": a, "b": a}, "epoch": 3})) == ["a", "b"]
    with pytest.raises(CheckpointReadError, match="'epoch' is a int, not a tensor"):
        unwrap_state_dict({"a": a, "epoch": 3})
    with pytest.raises(CheckpointReadError, match="'nested' is a dict"):
        unwrap_state_dict({"state_dict": {"a": a, "nested": {"b": a}}})


# ----------------------------------------------------------------------------------------------
# Writing


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "fp32": rng.standard_normal((4, 5)).astype(np.float32),
        "fp16": rng.standard_normal(7).astype(np.float16),
        "bf16": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "bool": np.array([True, False, True]),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": rng.standard_normal((3, 4)).astype(np.float32).T,  # non-contiguous input
        "big_endian": np.arange(4, dtype=">f4"),
        "f8": np.array([0.5, -2.0], ml_dtypes.float8_e4m3fn),
    }


def test_write_safetensors_roundtrip(tmp_path):
    arrays = _arrays()
    path = tmp_path / "sub" / "out.safetensors"
    write_safetensors(path, arrays, metadata={"format": "pt", "note": "ünïcode"})
    got = read_safetensors(path)
    assert set(got) == set(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype.newbyteorder("<") and got[k].shape == a.shape
        assert got[k].tobytes() == np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).tobytes()
    with R.SafetensorsReader(path) as r:
        assert r.metadata == {"format": "pt", "note": "ünïcode"}
        assert r.data_start % 8 == 0
    # the reference implementation reads it too
    ref = st_load_torch(path)
    for k, a in arrays.items():
        assert ref[k].dtype == {v: k2 for k2, v in _NP_OF_TORCH.items()}[a.dtype.newbyteorder("=").type]
        assert _bits(ref[k]) == np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).tobytes()
    # safetensors.numpy has no float8 support: check it on the other dtypes
    no_f8 = tmp_path / "no_f8.safetensors"
    write_safetensors(no_f8, {k: v for k, v in arrays.items() if k != "f8"})
    for k, v in st_load_numpy(no_f8).items():
        assert v.dtype == arrays[k].dtype.newbyteorder("<") and v.tobytes() == got[k].tobytes()
    no_f8.unlink()
    assert [p.name for p in path.parent.iterdir()] == ["out.safetensors"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_write_safetensors_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    calls = {"n": 0}
    real = R._write_array

    def failing(f, arr):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"partial")
            raise RuntimeError("simulated crash mid-write")
        real(f, arr)

    monkeypatch.setattr(R, "_write_array", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_safetensors(path, _arrays())
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []

    # an existing file is left intact by a failed rewrite
    monkeypatch.setattr(R, "_write_array", real)
    write_safetensors(path, {"x": np.ones(3, np.float32)})
    before = path.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(R, "_write_array", failing)
    with pytest.raises(RuntimeError):
        write_safetensors(path, _arrays())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_write_safetensors_rejects_bad_input(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="reserved"):
        write_safetensors(path, {"__metadata__": np.ones(1)})
    with pytest.raises(TypeError, match="metadata"):
        write_safetensors(path, {"a": np.ones(1)}, metadata={"k": 1})
    with pytest.raises(TypeError, match="cannot be stored"):
        write_safetensors(path, {"a": np.array(["s"])})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# No torch at all


def test_module_works_with_torch_blocked(tmp_path, torch_file):
    path, sd = torch_file
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    st = tmp_path / "w.safetensors"
    st_save_torch({"bf16": sd["bf16"].contiguous(), "fp32": sd["fp32"]}, st)
    expect = {k: _bits(t) for k, t in sd.items()}
    (tmp_path / "expect.pkl").write_bytes(pickle.dumps(expect))
    script = textwrap.dedent(
        f"""
        import pickle, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from anim_jax.convert import readers
        import numpy as np
        expect = pickle.loads(open({str(tmp_path / "expect.pkl")!r}, "rb").read())
        got = readers.read_checkpoint({str(path)!r})
        assert list(got) == list(expect), (list(got), list(expect))
        for k, v in got.items():
            assert np.ascontiguousarray(v).tobytes() == expect[k], k
        legacy = readers.read_checkpoint({str(legacy)!r})
        assert list(legacy) == list(expect)
        for k, v in legacy.items():
            assert np.ascontiguousarray(v).tobytes() == expect[k], k
        st = readers.read_checkpoint({str(st)!r})
        assert st["bf16"].tobytes() == expect["bf16"]
        readers.write_safetensors({str(tmp_path / "out.safetensors")!r}, st)
        assert readers.read_safetensors({str(tmp_path / "out.safetensors")!r})["fp32"].tobytes() == expect["fp32"]
        assert sys.modules["torch"] is None
        print("OK", len(got))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == f"OK {len(sd)}"


# ----------------------------------------------------------------------------------------------
# Legacy (pre-1.6, non-zip) torch files


def _save_legacy(obj, path, **kw):
    torch.save(obj, path, _use_new_zipfile_serialization=False, **kw)
    return path


def _legacy_parts(data: bytes) -> tuple[list[bytes], bytes]:
    """The five pickles of a legacy file (magic, version, sys_info, object, storage keys) and the
    storage records after them (parsed by pickletools, never unpickled)."""
    f = io.BytesIO(data)
    parts = []
    for _ in range(5):
        start = f.tell()
        for _ in pickletools.genops(f):
            pass
        parts.append(data[start : f.tell()])
    return parts, data[f.tell() :]


class _LegacyStorage:
    def __init__(self, key, numel, view=None, storage_type=torch.FloatStorage):
        self.key, self.numel, self.view, self.storage_type = key, numel, view, storage_type


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _LegacyStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel, obj.view)
        return None


_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}


def _write_legacy(path, obj, records: dict[str, bytes], *, itemsize=4, sys_info=_SYS_INFO, keys=None):
    """A legacy file laid out as torch's legacy writer does, with hand-made storage ids and records."""
    buf = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, sys_info):
        pickle.dump(head, buf, protocol=2)
    _LegacyPickler(buf, protocol=2).dump(obj)
    keys = list(records) if keys is None else keys
    pickle.dump(keys, buf, protocol=2)
    for key in keys:
        buf.write(struct.pack("<q", len(records[key]) // itemsize))
        buf.write(records[key])
    path.write_bytes(buf.getvalue())
    return path


def test_legacy_bitexact_all_dtypes_and_views(tmp_path):
    sd = _state_dict()  # every classic dtype, 0-d, empty, transposes, slices, stride 0, parameters
    sd["empty_i64"] = torch.empty(0, dtype=torch.int64)
    path = _save_legacy(sd, tmp_path / "legacy.pth")
    assert R.detect_format(path) == "torch_legacy"
    obj = read_torch_pickle(path)
    assert isinstance(obj, collections.OrderedDict) and list(obj) == list(sd)
    flat = read_checkpoint(path)
    assert list(flat) == list(sd)
    for k, t in sd.items():
        assert_bitexact(obj[k], t)
        assert_bitexact(flat[k], t)
    assert np.shares_memory(flat["row"], flat["base"])  # one storage, read once
    assert flat["transposed"].flags.c_contiguous
    with open_checkpoint(path) as r:
        assert isinstance(r, R.TorchPickleReader) and r.format == "torch_legacy"
        assert list(r) == list(sd)
        for k, t in sd.items():
            assert r.shape(k) == tuple(t.shape)
            assert r.dtype(k) == np.dtype(_NP_OF_TORCH[t.dtype])
            assert r.nbytes(k) == t.numel() * t.element_size()
        assert_bitexact(r["strided"], sd["strided"])
    for k, v in iter_checkpoint(path):
        assert_bitexact(v, sd[k])


def test_legacy_shared_storage_is_indexed_then_read_lazily_once(tmp_path, monkeypatch):
    base = torch.arange(40, dtype=torch.float32) * 0.5
    other = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    sd = {
        "a": base[2:10].view(2, 4),  # two tensors on one storage, different offsets
        "b": base[5:35:3],
        "c": base[12:36].view(4, 6).t(),
        "other": other,
    }
    path = _save_legacy(sd, tmp_path / "shared.pth")
    parts, _ = _legacy_parts(path.read_bytes())
    assert len(pickle.loads(parts[4])) == 2  # the storage key list: base's storage is stored once
    reads = []
    read_record = R._TorchLegacy._read_record

    def counting(self, key, size):
        reads.append(key)
        return read_record(self, key, size)

    monkeypatch.setattr(R._TorchLegacy, "_read_record", counting)
    with open_checkpoint(path) as r:
        assert reads == []  # opening reads the pickles and record sizes, no tensor data
        assert r.shape("c") == (6, 4) and r.dtype("b") == np.float32
        assert_bitexact(r["other"], other)
        assert len(reads) == 1
    reads.clear()
    flat = read_checkpoint(path)
    assert len(reads) == 2  # base's storage once for its three views
    for k, t in sd.items():
        assert_bitexact(flat[k], t)


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_nested_ordered_dict_and_module_state_dict(tmp_path, protocol):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    msd = model.state_dict()  # an OrderedDict with `_metadata` (BUILD), int64 num_batches_tracked
    sd = _state_dict()
    inner = collections.OrderedDict([("w", sd["bf16"]), ("h", sd["fp16"]), ("e", sd["empty"])])
    extra = {"lr": 1e-4, "names": ["a", "b"], "shape": (1, 2), "flag": True, "none": None}
    obj = {"state_dict": msd, "ema": {"inner": inner, "list": [sd["i64"], sd["slice"]]}, "epoch": 7, "extra": extra}
    path = _save_legacy(obj, tmp_path / f"nested{protocol}.ckpt", pickle_protocol=protocol)
    got = read_torch_pickle(path)
    assert got["epoch"] == 7 and got["extra"] == extra
    assert isinstance(got["ema"]["inner"], collections.OrderedDict) and list(got["ema"]["inner"]) == ["w", "h", "e"]
    for k, t in inner.items():
        assert_bitexact(got["ema"]["inner"][k], t)
    assert_bitexact(got["ema"]["list"][0], sd["i64"])
    assert_bitexact(got["ema"]["list"][1], sd["slice"])
    flat = read_checkpoint(path)  # unwraps "state_dict"
    assert list(flat) == list(msd)
    for k, t in msd.items():
        assert_bitexact(flat[k], t)


def test_legacy_newer_dtypes_and_conj(tmp_path):
    # Saved through an untyped storage and _rebuild_tensor_v3 (torch cannot read these back itself).
    sd = {
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
    }
    path = _save_legacy(sd, tmp_path / "newer.pth")
    got = read_checkpoint(path)
    for k, t in sd.items():
        assert_bitexact(got[k], t)


def test_legacy_cuda_saved_file_loads_to_host(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(4)
    sd = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).half()}
    with monkeypatch.context() as m:  # what torch writes for storages that lived on the GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        path = _save_legacy(sd, tmp_path / "cuda.pth")
    assert b"cuda:0" in path.read_bytes()
    if not torch.cuda.is_available():  # sanity: the file really asks torch for the GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    got = read_checkpoint(path)
    for k, t in sd.items():
        assert_bitexact(got[k], t)


def test_legacy_storage_views_of_old_files(tmp_path):
    """torch < 1.0 could store ids of storage *views* (view key, element offset, size)."""
    data = np.arange(12, dtype=np.float32) * 1.5
    obj = {
        "a": _Tensor(_LegacyStorage("root", 12, view=("v1", 2, 6)), 1, (2, 2), (1, 2)),
        "b": _Tensor(_LegacyStorage("root", 12, view=("v2", 8, 4)), 0, (4,), (1,)),
        "whole": _Tensor(_LegacyStorage("root", 12), 0, (3, 4), (4, 1)),
    }
    path = _write_legacy(tmp_path / "views.pth", obj, {"root": data.tobytes()})
    ref = torch.load(path, weights_only=True)  # torch's own reading of the same file
    got = read_checkpoint(path)
    for k in obj:
        assert_bitexact(got[k], ref[k])
    np.testing.assert_array_equal(got["a"], np.lib.stride_tricks.as_strided(data[3:], (2, 2), (4, 8)))
    np.testing.assert_array_equal(got["b"], data[8:12])


@pytest.mark.parametrize(
    "obj, records, keys, match",
    [
        ({"t": _Tensor(_LegacyStorage("0", 12, view=("v", 10, 4)), 0, (4,), (1,))}, {"0": bytes(48)}, None,
         "reaches past"),
        ({"t": _Tensor(_LegacyStorage("0", 4, view=("v", 0, 4)), 1, (4,), (1,))}, {"0": bytes(16)}, None,
         "reaches element"),
        ({"t": _Tensor(_LegacyStorage("0", 4), 0, (4,), (1,)),
          "u": _Tensor(_LegacyStorage("0", 4, storage_type=torch.DoubleStorage), 0, (2,), (1,))},
         {"0": bytes(16)}, None, "declared as"),
        ({"t": _Tensor(_LegacyStorage("0", 4), 0, (4,), (1,))}, {"0": bytes(16)}, [], "not stored"),
        ({"t": _Tensor(_LegacyStorage("0", 4), 0, (4,), (1,))}, {"0": bytes(16), "9": bytes(4)}, None,
         "does not use"),
        ({"t": _Tensor(_LegacyStorage("0", 4), 0, (4,), (1,))}, {"0": bytes(12)}, None, "elements on disk"),
    ],
)
def test_legacy_malformed_records_are_read_errors(tmp_path, obj, records, keys, match):
    path = _write_legacy(tmp_path / "bad.pth", obj, records, keys=keys)
    with pytest.raises(CheckpointReadError, match=match) as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)


def test_legacy_big_endian_sys_info_is_refused(tmp_path):
    obj = {"t": _Tensor(_LegacyStorage("0", 4), 0, (4,), (1,))}
    sys_info = dict(_SYS_INFO, little_endian=False)
    path = _write_legacy(tmp_path / "be.pth", obj, {"0": bytes(16)}, sys_info=sys_info)
    with pytest.raises(LegacyCheckpointError, match="big-endian") as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)
    ok = _write_legacy(tmp_path / "le.pth", obj, {"0": np.arange(4, dtype=np.float32).tobytes()})
    np.testing.assert_array_equal(read_checkpoint(ok)["t"], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", ["os.system", "exec"])
def test_legacy_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol, payload):
    marker = tmp_path / "MARKER"
    evil = _RunsShell(marker) if payload == "os.system" else _RunsExec(marker)
    path = _save_legacy({"weight": torch.ones(2), "evil": evil}, tmp_path / "evil.pth", pickle_protocol=protocol)
    assert R.detect_format(path) == "torch_legacy"
    for fn in (read_torch_pickle, read_checkpoint, open_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match="refusing to load") as ei:
            fn(path)
        assert str(path) in str(ei.value)
        assert ("system" in str(ei.value)) if payload == "os.system" else ("exec" in str(ei.value))
    assert not marker.exists()
    # sanity: the payload is live, an unrestricted load runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_legacy_find_class_refuses_even_without_prescan(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    path = _save_legacy({"evil": _RunsShell(marker)}, tmp_path / "evil.pth", pickle_protocol=4)
    monkeypatch.setattr(R, "_prescan", lambda *args, **kw: None)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load (posix|nt)\.system"):
        read_torch_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("part", [1, 2, 4])  # protocol version, sys_info, storage key list
def test_legacy_payload_in_a_header_pickle_is_refused(tmp_path, part):
    marker = tmp_path / "MARKER"
    good = _save_legacy({"w": torch.ones(3)}, tmp_path / "good.pth")
    parts, records = _legacy_parts(good.read_bytes())
    parts[part] = pickle.dumps(_RunsShell(marker), protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(b"".join(parts) + records)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load") as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)
    assert not marker.exists()


def test_legacy_truncated_and_corrupt_files(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = {"a": torch.randn(64, 64, generator=g), "b": torch.arange(10), "c": torch.randn(5, generator=g).half()}
    path = _save_legacy(sd, tmp_path / "w.pth")
    data = path.read_bytes()
    parts, _ = _legacy_parts(data)
    ends = list(itertools.accumulate(len(p) for p in parts))
    cuts = {
        "magic": (10, "truncated or corrupt"),
        "version": (ends[0] + 3, "truncated or corrupt"),
        "sys_info": (ends[1] + 20, "truncated or corrupt"),
        "object": (ends[2] + 40, "truncated or corrupt"),
        "keys": (ends[3] + 5, "truncated or corrupt"),
        "no_records": (ends[4], "truncated"),
        "count": (ends[4] + 5, "truncated"),
        "half": (len(data) // 2, "truncated"),
        "last_byte": (len(data) - 1, "truncated"),
    }
    for name, (cut, match) in cuts.items():
        bad = tmp_path / f"cut_{name}.pth"
        bad.write_bytes(data[:cut])
        for fn in (read_checkpoint, read_torch_pickle, open_checkpoint):
            with pytest.raises(CheckpointReadError, match=match) as ei:
                fn(bad)
            assert str(bad) in str(ei.value), (name, ei.value)
    # a corrupt element count, and a corrupt pickle byte
    bad = bytearray(data)
    bad[ends[4] : ends[4] + 8] = struct.pack("<q", 2**40)
    (tmp_path / "count.pth").write_bytes(bytes(bad))
    with pytest.raises(CheckpointReadError, match="elements on disk") as ei:
        read_checkpoint(tmp_path / "count.pth")
    assert str(tmp_path / "count.pth") in str(ei.value)
    # a byte string claiming 2**60 bytes: a clear error, nothing of that size is read or allocated
    huge = b"".join(parts[:3]) + b"\x80\x04\x8e" + struct.pack("<Q", 2**60) + b"." + data[ends[3] :]
    (tmp_path / "huge.pth").write_bytes(huge)
    with pytest.raises(CheckpointReadError, match="truncated or corrupt") as ei:
        read_checkpoint(tmp_path / "huge.pth")
    assert str(tmp_path / "huge.pth") in str(ei.value)
    bad = bytearray(data)
    bad[ends[2] + 2] = ord("\xff")  # an opcode that does not exist
    (tmp_path / "opcode.pth").write_bytes(bytes(bad))
    with pytest.raises(CheckpointReadError, match="truncated or corrupt") as ei:
        read_checkpoint(tmp_path / "opcode.pth")
    assert str(tmp_path / "opcode.pth") in str(ei.value)
