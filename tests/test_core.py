"""The shared pieces: attention implementations agree, sharding rules place what they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import PartitionSpec as P

from anim_jax import parallel
from anim_jax.models import layers
from anim_jax.models.attention_ops import AttentionConfig, dot_product_attention


def _qkv(seed, b=2, lq=37, lk=53, h=3, d=8):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


def test_xla_attention_matches_torch_sdpa():
    q, k, v = _qkv(0)
    ours = dot_product_attention(q, k, v, AttentionConfig("xla"))
    t = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 2, 1, 3)
    ref = F.scaled_dot_product_attention(t(q), t(k), t(v)).permute(0, 2, 1, 3).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 64])
def test_chunked_attention_equals_plain(chunk):
    q, k, v = _qkv(1)
    plain = dot_product_attention(q, k, v, AttentionConfig("xla"))
    chunked = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, AttentionConfig("chunked", query_chunk_size=chunk)))(q, k, v)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), atol=1e-6)


def test_chunked_attention_gradients_equal_plain():
    q, k, v = _qkv(2, lq=20, lk=11)
    loss = lambda impl: lambda q: (dot_product_attention(q, k, v, AttentionConfig(impl, query_chunk_size=6)) ** 2).sum()
    np.testing.assert_allclose(np.asarray(jax.grad(loss("chunked"))(q)), np.asarray(jax.grad(loss("xla"))(q)), atol=1e-5)


def test_auto_attention_on_cpu_equals_plain_when_it_tiles():
    q, k, v = _qkv(3, lq=40, lk=40)  # auto's CPU policy picks flash here (test_attention_flash.py)
    cfg = AttentionConfig("auto", fused_min_kv_length=16, flash_min_elements=100, flash_query_block=16)
    np.testing.assert_allclose(
        np.asarray(dot_product_attention(q, k, v, cfg)), np.asarray(dot_product_attention(q, k, v)), atol=1e-6
    )


def test_attention_config_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="flashy"):
        AttentionConfig("flashy")


@pytest.mark.parametrize("in_size,out_size", [(13, 25), (7, 14), (4, 9), (5, 5)])
def test_upsample_nearest_matches_torch(in_size, out_size):
    x = np.random.default_rng(0).standard_normal((2, in_size, in_size + 1, 3)).astype(np.float32)
    ours = layers.upsample_nearest(jnp.asarray(x), (out_size, out_size + 2))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(out_size, out_size + 2), mode="nearest")
    np.testing.assert_array_equal(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("size,kernel,stride", [((1, 1), 3, 1), ((2, 2), 3, 1), ((2, 2), 3, 2), ((2, 1), 3, 1),
                                                ((1, 2), 3, 2), ((2, 2), 1, 1), ((2, 2), 1, 2),
                                                ((3, 3), 3, 1)])
def test_conv2d_matches_torch_on_tiny_inputs(size, kernel, stride):
    """Inputs of at most 2x2 pixels take the folded-kernel matmul, 3x3 the convolution."""
    r = np.random.default_rng(0)
    conv = layers.Conv2d(6, 5, kernel, stride=stride, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.asarray(r.standard_normal(5).astype(np.float32))
    x = r.standard_normal((4,) + size + (6,)).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(np.asarray(conv.kernel[...])).permute(3, 2, 0, 1),
                   torch.from_numpy(np.asarray(conv.bias[...])), stride=stride, padding=kernel // 2)
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-6)


def test_group_norm_per_frame_and_pooled_match_torch():
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 3, 5, 4, 8)).astype(np.float32)  # (B, F, H, W, C)
    gn = layers.GroupNorm(4, 8, eps=1e-6, rngs=nnx.Rngs(0))
    gn.scale[...] = jnp.asarray(r.standard_normal(8), jnp.float32)
    gn.bias[...] = jnp.asarray(r.standard_normal(8), jnp.float32)
    tgn = torch.nn.GroupNorm(4, 8, eps=1e-6)
    tgn.weight.data = torch.from_numpy(np.asarray(gn.scale[...]))
    tgn.bias.data = torch.from_numpy(np.asarray(gn.bias[...]))
    xt = torch.from_numpy(x)
    per_frame = gn(jnp.asarray(x).reshape(6, 5, 4, 8)).reshape(x.shape)
    ref = tgn(xt.reshape(6, 5, 4, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(per_frame), ref.detach().numpy(), atol=1e-5)
    pooled = gn(jnp.asarray(x).reshape(2, 60, 8)).reshape(x.shape)
    ref5 = tgn(xt.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # 5-D GroupNorm pools frames
    np.testing.assert_allclose(np.asarray(pooled), ref5.detach().numpy(), atol=1e-5)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 999], np.float32)
    for flip, shift in ((True, 0.0), (False, 1.0)):
        ours = layers.timestep_embedding(jnp.asarray(t), 32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        ref = get_timestep_embedding(torch.from_numpy(t), 32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        # sin of args up to ~1000 in float32: XLA and torch differ by a few ulps of the argument.
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4)


def test_make_mesh_fills_minus_one_and_is_auto(devices):
    mesh = parallel.make_mesh((2, -1), ("data", "fsdp"))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh((4, 4), ("data", "fsdp"))


_USE_CPU_DEVICES = """
import os, jax
from anim_jax import parallel
parallel.use_cpu_devices(3)
print(len(jax.devices()), jax.devices()[0].platform, os.environ["XLA_FLAGS"])
"""


@pytest.mark.parametrize("flags,expected", [("--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false"),
                                            ("--xla_cpu_multi_thread_eigen=true", "--xla_cpu_multi_thread_eigen=true")])
def test_use_cpu_devices_makes_one_thread_devices_in_a_fresh_process(flags, expected):
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", _USE_CPU_DEVICES], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    count, platform, got = p.stdout.split(maxsplit=2)
    assert (count, platform) == ("3", "cpu")
    assert expected in got.split() and got.count("xla_cpu_multi_thread_eigen") == 1  # a caller's choice is kept


def test_use_cpu_devices_refuses_once_the_backends_are_up(devices):
    with pytest.raises(RuntimeError, match="before JAX initialises its backends"):
        parallel.use_cpu_devices(2)
    with pytest.raises(ValueError, match=">= 1"):
        parallel.use_cpu_devices(0)


def test_logical_rules_shard_only_divisible_dims(devices):
    mesh = parallel.make_mesh((2, 4), ("data", "fsdp"))
    assert parallel.logical_to_spec(("embed", "mlp"), (16, 12), mesh) == P("fsdp", None)
    assert parallel.logical_to_spec(("embed", "mlp"), (6, 12), mesh) == P(None, None)  # 6 % 4 != 0
    assert parallel.logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 8, 8), mesh) == P(None, None, "fsdp", None)
    rules = (("embed", ("data", "fsdp")),)
    assert parallel.logical_to_spec(("embed",), (16,), mesh, rules) == P(("data", "fsdp"))


def test_shard_model_places_params_and_keeps_values(devices):
    mesh = parallel.make_mesh((2, 4), ("data", "fsdp"))
    lin = layers.Linear(16, 8, rngs=nnx.Rngs(0))
    before = np.asarray(lin.kernel[...])
    parallel.shard_model(lin, mesh)
    assert lin.kernel[...].sharding.spec == P("fsdp", None)
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), before)
