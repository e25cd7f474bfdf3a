"""The one strict loader (anim_jax.convert.loader.load), the weights-directory format, and the layering
rule that models/ knows no checkpoint format."""

import ast
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file  # the reference implementation, as an independent reader

from anim_jax import compile_memory, parallel, weights_dir
from anim_jax.convert.components import load_components
from anim_jax.convert.loader import load
from anim_jax.convert.mapping import CheckpointMismatchError, KeyMap, flat_params
from anim_jax.convert.readers import write_safetensors
from anim_jax.models import layers

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = layers.Conv2d(3, 4, rngs=rngs)
        self.proj = nnx.List([layers.Linear(4, 8, rngs=rngs)])


def values(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in flat_params(model).items()}


def test_strict_load_reports_every_problem_and_changes_nothing():
    model = Net(nnx.Rngs(0))
    before = values(model)
    source = {k: v + 1 for k, v in before.items()}
    del source["conv.bias"]
    source["proj.0.kernel"] = np.zeros((8, 4), np.float32)
    source["proj.0.bias"] = np.zeros(8, np.int32)
    source["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load(model, source, name="net.safetensors")
    msg = str(e.value)
    assert msg.startswith("net.safetensors does not match the model:")
    for needle in ("1 missing keys:\n    conv.bias (4,)", "1 unexpected keys:\n    extra.weight (2,)",
                   "proj.0.kernel: checkpoint (8, 4), model expects (4, 8)", "proj.0.bias: int32, expected floating point"):
        assert needle in msg, msg
    after = values(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_torch_layout_select_ignore_and_report():
    donor, model = Net(nnx.Rngs(1)), Net(nnx.Rngs(2))
    want = values(donor)
    # A PyTorch state dict: conv OIHW, Linear (out, in), kernel -> weight; plus a buffer to ignore.
    torch_sd = {
        "conv.weight": want["conv.kernel"].transpose(3, 2, 0, 1), "conv.bias": want["conv.bias"],
        "proj.0.weight": want["proj.0.kernel"].T, "proj.0.bias": want["proj.0.bias"],
        "conv.num_batches_tracked": np.zeros((), np.int64),
    }
    keymap = KeyMap(ignored=(r"num_batches_tracked$",))
    kept = values(model)["proj.0.kernel"]
    report = load(model, torch_sd, keymap=keymap, select=lambda p: not p.startswith("proj."))
    assert set(report.loaded) == {"conv.kernel", "conv.bias"}  # proj.* not selected: their keys are skipped
    assert str(report) == "loaded 2 parameters from checkpoint (1 source keys unused)"
    assert report.unused == ("conv.num_batches_tracked",)
    got = values(model)
    np.testing.assert_array_equal(got["conv.kernel"], want["conv.kernel"])
    np.testing.assert_array_equal(got["proj.0.kernel"], kept)
    del torch_sd["proj.0.bias"]
    report = load(model, torch_sd, keymap=keymap, allow_missing=lambda p: p == "proj.0.bias")
    assert report.kept == ("proj.0.bias",) and "proj.0.kernel" in report.loaded
    with pytest.raises(CheckpointMismatchError, match="missing keys:\n    proj.0.bias"):
        load(model, torch_sd, keymap=keymap)
    # Another module as the source (the ReferenceNet-from-denoiser copy).
    copy = Net(nnx.Rngs(5))
    load(copy, donor)
    assert all(np.array_equal(a, values(donor)[k]) for k, a in values(copy).items())
    for var in flat_params(donor).values():  # own buffers: a donating step may free the donor's
        var.value.delete()
    assert all(np.array_equal(a, want[k]) for k, a in values(copy).items())


class OddNet(nnx.Module):
    """Parameter shapes no other test makes, so nothing about them is compiled yet."""

    def __init__(self, rngs):
        self.conv = layers.Conv2d(5, 11, rngs=rngs)
        self.proj = nnx.List([layers.Linear(11, 13, rngs=rngs)])


def test_loading_host_arrays_copies_them_without_compiling():
    # jnp.array(host, copy=True) compiled a conversion program per parameter shape, and kept it:
    # ~70 MiB for the side-by-side's tiny model (benchmarks/RESULTS.md, "Issue 19, CPU round 13").
    # abstract parameters (as the pipeline builds its networks), so nothing is computed on them yet
    model = nnx.eval_shape(lambda: OddNet(nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    source = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in flat_params(model).items()}
    compiles = []

    def listener(event, duration, **kwargs):
        if event == compile_memory.COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        report = load(model, source)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(report.loaded) == 4 and compiles == []
    expected = {k: v.copy() for k, v in source.items()}
    for v in source.values():  # the host arrays change after loading; the model's copies do not
        v += 100
    got = values(model)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_load_keeps_shardings(devices, tmp_path):
    mesh = parallel.make_mesh((8,), ("fsdp",))
    source = Net(nnx.Rngs(3))
    write_safetensors(tmp_path / "net.safetensors", values(source))
    model = Net(nnx.Rngs(4))
    placed = {"proj.0.kernel": NamedSharding(mesh, P(None, "fsdp")), "proj.0.bias": NamedSharding(mesh, P("fsdp"))}
    for path, var in flat_params(model).items():
        var.value = jax.device_put(var[...], placed.get(path, NamedSharding(mesh, P())))
    load(model, tmp_path / "net.safetensors")
    for path, var in flat_params(model).items():
        assert var.value.sharding == placed.get(path, NamedSharding(mesh, P())), path
        np.testing.assert_array_equal(np.asarray(var[...]), values(source)[path])


def test_directories_written_before_the_loader_rework_still_load():
    directory = ROOT / "tests" / "data" / "weights_dir_v1"
    guider = load_components(directory, components=("pose_guider",))["pose_guider"]
    stored = load_file(str(directory / "pose_guider.safetensors"))
    got = values(guider)
    assert set(got) == set(stored)
    for k in stored:
        np.testing.assert_array_equal(got[k], stored[k])


def test_truncated_weights_file_is_one_line_from_the_cli(tmp_path):
    """`anim-jax animate` on a converted-weights directory whose file was cut short: exit 2, one line
    naming the file, no traceback."""
    weights = tmp_path / "weights"
    weights.mkdir()
    tiny_unet = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
                 "num_attention_heads": 2, "cross_attention_dim": 32, "norm_num_groups": 8}
    weights_dir.write_config(weights, {"denoiser": tiny_unet})
    data = (ROOT / "tests" / "data" / "weights_dir_v1" / "pose_guider.safetensors").read_bytes()
    (weights / "denoiser.safetensors").write_bytes(data[: len(data) - 100])
    # Inputs that pass animate's own checks, so the weights are what fails.
    (tmp_path / "ref.png").write_bytes(b"")
    (tmp_path / "pose.mp4").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "anim_jax.cli", "animate", "--weights", str(weights), "--reference", "ref.png",
         "--pose", "pose.mp4", "--out", str(tmp_path / "out.mp4")], cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(weights / "denoiser.safetensors") in lines[0] and "truncated" in lines[0], lines


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a module of anim_jax (relative imports resolved)."""
    package = list(path.relative_to(ROOT).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("files, higher, allowed", [
    ("anim_jax/models/*.py", ("anim_jax.convert", "anim_jax.train", "anim_jax.pipeline", "anim_jax.demo"), ()),
    ("anim_jax/weights_dir.py", ("anim_jax.models", "anim_jax.convert"), ()),
    ("anim_jax/atomic.py", ("anim_jax.",), ("anim_jax", "anim_jax.storage")),  # local or gs:// paths
    ("anim_jax/storage.py", ("anim_jax.",), ()),
])
def test_layers_point_one_way(files, higher, allowed):
    """models/ knows no checkpoint format; the weights-directory format and the writer sit below both."""
    paths = sorted(ROOT.glob(files))
    assert paths
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in paths for line, m in _imports(p)
                 if m not in allowed and any(m == h.rstrip(".") or m.startswith(h.rstrip(".") + ".") for h in higher)]
    assert not offenders, offenders
