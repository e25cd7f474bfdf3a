"""The pose networks' scoped XLA:CPU option (``anim_jax.pose.compile_options``): it reaches the
compiler, changes only the jits it is given to, and leaves the numbers equal to float32 rounding."""

import jax
import numpy as np
import pytest
from flax import nnx

from anim_jax.pose import compile_options
from anim_jax.pose.layers import ConvAct


@pytest.fixture(scope="module")
def layer_and_input():
    # Large enough that XLA:CPU hands the convolution to YNNPACK by default (small ones stay in XLA).
    layer = ConvAct(128, 128, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 80, 80, 128))
    graph, state = nnx.split(layer)
    return (lambda s, v: nnx.merge(graph, s)(v)), state, x


def test_cpu_jit_leaves_ynnpack_and_others_keep_it(layer_and_input, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # read per call; the backend already started
    fn, state, x = layer_and_input
    scoped = compile_options.jit(fn, "cpu").lower(state, x).compile().as_text()
    default = jax.jit(fn).lower(state, x).compile().as_text()
    assert "__ynn_fusion" in default  # XLA's default for this conv, which the option turns off
    assert "__ynn_fusion" not in scoped and "convolution(" in scoped


def test_same_numbers_as_the_default_path(layer_and_input):
    fn, state, x = layer_and_input
    a = np.asarray(compile_options.jit(fn, "cpu")(state, x))
    b = np.asarray(jax.jit(fn)(state, x))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_only_cpu_and_a_users_own_xla_flag_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert compile_options.compiler_options("cpu") == {compile_options.YNN_FUSION_OPTION: ""}
    assert compile_options.compiler_options("gpu") is None and compile_options.compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", f"--{compile_options.YNN_FUSION_OPTION}=individual_dot")
    assert compile_options.compiler_options("cpu") is None
