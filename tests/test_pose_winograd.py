"""Winograd F(4x4, 3x3) convolutions (``anim_jax.pose.winograd``) and the pose networks' use of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anim_jax.pose import compile_options, winograd
from anim_jax.pose.layers import ConvAct, WinogradKernel, use_winograd


def test_matrices_compute_a_correlation_exactly():
    # Float64, one dimension: AT [(G g) * (BT d)] is the 4-output correlation of 6 inputs with 3 taps.
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, g = rng.standard_normal(6), rng.standard_normal(3)
        expected = np.correlate(d, g, mode="valid")
        np.testing.assert_allclose(winograd.AT @ ((winograd.G @ g) * (winograd.BT @ d)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 8, 8, 16, 24), (1, 7, 10, 32, 8), (1, 12, 9, 8, 8), (1, 1, 3, 4, 4)])
def test_conv3x3_equals_a_direct_convolution(shape):
    b, h, w, c, k = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, c, k)) / np.sqrt(9 * c)).astype(np.float32)
    # Reference: the same convolution in float64 numpy, tap by tap.
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(xp[:, i : i + h, j : j + w] @ kernel[i, j].astype(np.float64) for i in range(3) for j in range(3))
    out = jax.jit(winograd.conv3x3)(jnp.asarray(x), winograd.transform_kernel(jnp.asarray(kernel)))
    assert out.shape == (b, h, w, k)
    # Reached: <= 1.4e-6 of the largest output (XLA's direct convolution: <= 3e-7).
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0, atol=5e-6 * np.abs(ref).max())


def test_transform_kernel_needs_3x3():
    with pytest.raises(ValueError, match="3x3 kernel"):
        winograd.transform_kernel(jnp.zeros((5, 5, 4, 4)))


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.wide = ConvAct(8, 8, 3, rngs=rngs)  # the only layer eligible at min_channels=8
        self.narrow = ConvAct(8, 4, 3, rngs=rngs)
        self.strided = ConvAct(4, 8, 3, stride=2, rngs=rngs)
        self.pointwise = ConvAct(8, 8, 1, rngs=rngs)
        self.depthwise = ConvAct(8, 8, 3, groups=8, rngs=rngs)

    def __call__(self, x):
        return self.depthwise(self.pointwise(self.strided(self.narrow(self.wide(x)))))


def test_use_winograd_converts_only_eligible_layers_of_a_copy():
    net = _Net(nnx.Rngs(0))
    kernel_before = np.asarray(net.wide.kernel[...])
    prepared = use_winograd(net, min_channels=8)
    assert isinstance(prepared.wide.kernel, WinogradKernel) and prepared.wide.kernel.shape == (36, 8, 8)
    for name in ("narrow", "strided", "pointwise", "depthwise"):
        assert not isinstance(getattr(prepared, name).kernel, WinogradKernel), name
    # The original is untouched and still runs direct; both give the same outputs.
    assert not isinstance(net.wide.kernel, WinogradKernel)
    np.testing.assert_array_equal(np.asarray(net.wide.kernel[...]), kernel_before)
    assert compile_options.winograd_layers(prepared) == 1 and compile_options.winograd_layers(net) == 0
    x = jax.random.normal(jax.random.key(2), (2, 12, 12, 8))
    a, b = np.asarray(nnx.jit(lambda m, v: m(v))(net, x)), np.asarray(nnx.jit(lambda m, v: m(v))(prepared, x))
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * np.abs(a).max())
    # Preparing twice changes nothing more; bfloat16 layers stay direct.
    assert compile_options.winograd_layers(use_winograd(prepared, min_channels=8)) == 1
    bf16 = nnx.eval_shape(lambda: ConvAct(8, 8, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert not bf16.winograd_eligible(min_channels=8)


def test_prepare_uses_winograd_on_cpu_only():
    layer = ConvAct(128, 128, 3, rngs=nnx.Rngs(0))
    assert compile_options.winograd_layers(compile_options.prepare(layer, "cpu")) == 1
    assert compile_options.prepare(layer, "gpu") is layer and compile_options.prepare(layer, "tpu") is layer
    assert compile_options.prepare(layer, "cpu", winograd=False) is layer
    assert compile_options.winograd_layers(compile_options.prepare(layer, "gpu", winograd=True)) == 1


def test_sharded_over_the_mesh_equals_one_device():
    # The extractor shards frames over a 1-D mesh; the tile reshapes keep the batch outermost.
    from jax.sharding import NamedSharding, PartitionSpec as P

    from anim_jax.parallel import make_mesh

    mesh = make_mesh((len(jax.devices()),), ("data",))
    x = jax.random.normal(jax.random.key(3), (len(jax.devices()), 9, 6, 8))
    u = winograd.transform_kernel(jax.random.normal(jax.random.key(4), (3, 3, 8, 8)))
    single = np.asarray(jax.jit(winograd.conv3x3)(x, u))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded = jax.jit(winograd.conv3x3, out_shardings=NamedSharding(mesh, P("data")))(xs, u)
    assert len(sharded.sharding.device_set) == len(jax.devices()) > 1
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=0, atol=1e-6 * np.abs(single).max())
