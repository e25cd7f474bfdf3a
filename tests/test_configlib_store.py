"""Config overrides are typed and strict; the converted-weights store round-trips exactly."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from anim_jax import configlib
from anim_jax.convert import store
from anim_jax.convert.mapping import CheckpointMismatchError
from anim_jax.models import layers


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.lr = 1e-5\n    c.steps = 10\n    c.name = 'x'\n    c.flag = False\n"
        "    c.mesh = ml_collections.ConfigDict({'shape': (1, -1)})\n"
        "    c.variant = arg or 'full'\n"
        "    return c\n"
    )
    return path


def test_overrides_are_parsed_by_field_type(config_file):
    c = configlib.load_config(
        f"{config_file}:tiny",
        ["--config.lr=3e-4", "--config.steps=7", "--config.flag=true", "--config.name=abc", "--config.mesh.shape=(2,4)"],
    )
    assert (c.lr, c.steps, c.flag, c.name, c.mesh.shape, c.variant) == (3e-4, 7, True, "abc", (2, 4), "tiny")
    assert isinstance(c.lr, float)
    assert configlib.load_config(str(config_file), ["--config.lr=2"]).lr == 2.0  # an int spelling of a float field


@pytest.mark.parametrize(
    "override,match",
    [("--config.stepz=3", "no field 'stepz'"), ("--config.steps=abc", "cannot parse"), ("--config.steps=1.5", "expected int"),
     ("--config.flag=maybe", "expected a boolean"), ("steps=3", "expected --config"),
     ("--config.lr=inf", "lr: expected a finite number, got 'inf'"), ("--config.lr=nan", "expected a finite number"),
     ("--config.lr=fast", "lr: expected a number, got 'fast'"), ("--config.lr.x=1", r"no field 'x' \(not a config section\)"),
     ("--config.mesh.shap=(1,)", r"no field 'shap' \(known: shape\)")],
)
def test_bad_overrides_name_the_field(config_file, override, match):
    with pytest.raises(configlib.ConfigError, match=match):
        configlib.load_config(str(config_file), [override])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        configlib.load_config_file(str(tmp_path / "nope.py"))


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.conv = layers.Conv2d(3, 4, rngs=rngs)
        self.proj = nnx.List([layers.Linear(4, 5, rngs=rngs)])


def test_store_round_trip_is_exact_and_strict(tmp_path):
    a, b = Tiny(nnx.Rngs(0)), Tiny(nnx.Rngs(1))
    store.save_params(a, tmp_path / "m.safetensors")
    store.load_params(b, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(np.asarray(b.conv.kernel[...]), np.asarray(a.conv.kernel[...]))
    np.testing.assert_array_equal(np.asarray(b.proj[0].bias[...]), np.asarray(a.proj[0].bias[...]))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    class Other(nnx.Module):
        def __init__(self, rngs):
            self.conv = layers.Conv2d(3, 6, rngs=rngs)

    with pytest.raises(CheckpointMismatchError, match=r"(?s)m\.safetensors.*unexpected keys:\n    proj\.0\.bias"
                       r".*misshaped keys:\n    conv\.bias: checkpoint \(4,\), model expects \(6,\)"):
        store.load_params(Other(nnx.Rngs(0)), tmp_path / "m.safetensors")


def test_store_config_round_trip_and_errors(tmp_path):
    store.write_config(tmp_path, {"unet": {"a": 1}})
    assert store.read_config(tmp_path)["unet"] == {"a": 1}
    with pytest.raises(FileNotFoundError, match="anim-jax convert"):
        store.read_config(tmp_path / "empty")
    (tmp_path / store.CONFIG_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        store.read_config(tmp_path)
