"""Row-wise layer stacks over chunks of rows (``anim_jax.models.row_chunks``): the same numbers as
one call, a loop only where one is asked for, and under a mesh every device loops over its own rows."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from anim_jax import parallel
from anim_jax.models import row_chunks
from anim_jax.models.attention_ops import AttentionConfig
from anim_jax.models.motion import MotionConfig, MotionModule
from anim_jax.models.transformer import BasicTransformerBlock
from helpers import randomise

_W = jnp.asarray(np.random.default_rng(0).standard_normal((6, 40)), jnp.float32)


def _rowwise(x):
    h = jnp.tanh(x @ _W)
    return h * jnp.mean(h, axis=-1, keepdims=True)  # a per-row reduction too


def _loops(fn, *args) -> int:
    return len(re.findall(r"\bscan\[", str(jax.make_jaxpr(fn)(*args))))


@pytest.mark.parametrize("rows, chunk, loops", [
    (30, 30, 0),    # one chunk: no loop
    (30, 100, 0),
    (30, 5, 1),     # a divisor
    (30, 4, 1),     # 3 divides 30 and is within half of 4
    (31, 8, 1),     # 31 is prime: chunks of 8, the last padded
])
def test_map_rows_equals_one_call(rows, chunk, loops):
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 6)), jnp.float32)
    fn = lambda x: row_chunks.map_rows(_rowwise, x, chunk_rows=chunk)  # noqa: E731
    assert _loops(fn, x) == loops
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x)), np.asarray(_rowwise(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [64, 60])  # 60: 15 rows per device, chunks padded
def test_each_device_loops_over_its_own_rows(devices, rows):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, 6)), jnp.float32)
    want = np.asarray(_rowwise(x))
    mesh = parallel.make_mesh((2, 2), ("data", "fsdp"), devices=devices[:4])
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    fn = jax.jit(lambda x: row_chunks.map_rows(_rowwise, x, chunk_rows=4))
    with jax.set_mesh(mesh):
        got = fn(xs)
        hlo = fn.lower(xs).compile().as_text()
    assert got.sharding.spec[0] == ("data", "fsdp")
    assert "while" in hlo and not re.search(r"all-gather|all-to-all|all-reduce|collective-permute", hlo)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_rows_that_do_not_split_over_the_mesh_loop_as_one(devices):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((18, 6)), jnp.float32)  # 18 rows, 4 devices
    mesh = parallel.make_mesh((4,), ("data",), devices=devices[:4])
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x: row_chunks.map_rows(_rowwise, x, chunk_rows=4))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_rowwise(x)), rtol=1e-6, atol=1e-6)


def _pair(make, elements):
    """The same module (same random parameters) with row chunks of ``elements``, and without."""
    pair = []
    for cfg in (AttentionConfig(row_chunk_elements=elements), AttentionConfig(row_chunk_elements=0)):
        module = make(cfg)
        randomise(module, seed=5)
        pair.append(module)
    return pair


def test_transformer_block_and_motion_module_in_row_chunks_equal_one_call():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 30, 16)), jnp.float32)  # 2 videos x 2 frames of 30 tokens
    ctx = jnp.asarray(rng.standard_normal((2, 3, 12)), jnp.float32)
    # 7 of the 120 token rows (8 x 16 wide in the feed-forward) at a time
    chunked, whole = _pair(lambda cfg: BasicTransformerBlock(16, heads=2, dim_head=8, context_dim=12, attention=cfg,
                                                             rngs=nnx.Rngs(0)), 8 * 16 * 7)
    run = nnx.jit(lambda m, x: m(x, ctx, num_frames=2)[0])
    assert _loops(lambda x: chunked(x, ctx, num_frames=2)[0], x) == 1
    assert _loops(lambda x: whole(x, ctx, num_frames=2)[0], x) == 0
    np.testing.assert_allclose(np.asarray(run(chunked, x)), np.asarray(run(whole, x)), rtol=2e-6, atol=2e-6)

    video = jnp.asarray(rng.standard_normal((2, 5, 3, 4, 16)), jnp.float32)
    # 5 of the 24 positions (5 frames x 8 x 16 wide in the feed-forward) at a time
    chunked, whole = _pair(lambda cfg: MotionModule(16, MotionConfig(num_attention_heads=2, norm_num_groups=4),
                                                    attention=cfg, rngs=nnx.Rngs(0)), 8 * 5 * 16 * 5)
    assert _loops(chunked, video) == 1 and _loops(whole, video) == 0
    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(run(chunked, video)), np.asarray(run(whole, video)), rtol=2e-6, atol=2e-6)


def test_negative_chunk_is_refused():
    with pytest.raises(ValueError, match="row_chunk_elements"):
        AttentionConfig(row_chunk_elements=-1)
