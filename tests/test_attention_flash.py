"""The flash (tiled, online-softmax) attention equals the plain path, never builds the score
matrix, and is what ``auto`` picks for long key sequences on the CPU."""

import contextlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anim_jax.models import attention_ops
from anim_jax.models.attention_ops import AttentionConfig, _auto_implementation, dot_product_attention
from anim_jax.models.transformer import Attention, ReferenceKV

# Float32 differences reached: up to 4e-6 absolute on outputs of order 1 with several key blocks
# (the online softmax rescales its running sums per block and divides once at the end).
ATOL, RTOL = 8e-6, 1e-5


def _qkv(seed, b, lq, lk, h, d, dv=None):
    r = np.random.default_rng(seed)
    shapes = ((b, lq, h, d), (b, lk, h, d), (b, lk, h, dv or d))
    return tuple(jnp.asarray(r.standard_normal(s) * 2, jnp.float32) for s in shapes)


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    bad = np.abs(got - want) > ATOL + RTOL * np.abs(want)
    assert not bad.any(), f"{bad.sum()} of {bad.size} elements differ; max {np.abs(got - want).max():.3g}"


# (b, lq, lk, h, d, dv, query block, kv block, tile elements): one block each way; odd lengths
# padded in queries, keys and groups; several key blocks with a ragged last one; value width
# different from the key width.
SHAPES = [
    (2, 37, 53, 3, 8, None, 128, 4096, 2**18),
    (3, 37, 53, 2, 8, None, 8, 16, 300),
    (1, 50, 129, 5, 16, None, 7, 32, 7 * 32 * 2),
    (2, 24, 24, 4, 8, 12, 5, 10, 1),
]


@pytest.mark.parametrize("on_cpu_mesh", [False, True])
@pytest.mark.parametrize("b,lq,lk,h,d,dv,qb,kb,tile", SHAPES)
def test_flash_equals_plain(b, lq, lk, h, d, dv, qb, kb, tile, on_cpu_mesh, devices):
    """Also on a mesh of two CPU devices, where the row maxima are trees of maxima over halves (odd
    lengths included) and the row sums products with ones (``flash_cpu_mesh_query_block``)."""
    from anim_jax import parallel

    q, k, v = _qkv(lq + lk, b, lq, lk, h, d, dv)
    cfg = AttentionConfig("flash", flash_query_block=qb, flash_kv_block=kb, flash_tile_elements=tile)
    lengths = jnp.asarray(np.random.default_rng(lk).integers(1, lk + 1, b))  # includes short rows
    mesh = parallel.make_mesh((2,), ("data",), devices[:2])
    for kv_lengths in (None, lengths):
        want = dot_product_attention(q, k, v, AttentionConfig("xla"), kv_lengths=kv_lengths)
        with jax.set_mesh(mesh) if on_cpu_mesh else contextlib.nullcontext():
            got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, cfg, kv_lengths=kv_lengths))(q, k, v)
        _close(got, want)


def test_flash_reference_concat_with_per_video_switch_equals_plain():
    """The denoiser's reference attention as training and CFG use it: 2 videos x 3 frames, each
    frame's keys are its 20 tokens + the video's 20 reference tokens, the second video's reference
    masked off. Key blocks of 16 split the frame/reference boundary and the mask."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 20, 16)), jnp.float32)
    ref = jnp.asarray(np.random.default_rng(1).standard_normal((2, 20, 16)), jnp.float32)
    outs = {}
    for name, cfg in (("xla", AttentionConfig("xla")),
                      ("flash", AttentionConfig("flash", flash_query_block=8, flash_kv_block=16, flash_tile_elements=256))):
        attn = Attention(16, heads=2, dim_head=8, attention=cfg, rngs=nnx.Rngs(0))
        kv = attn.project_kv(ref)
        outs[name] = attn(x, num_frames=3, extra_kv=ReferenceKV(kv.k, kv.v, jnp.asarray([True, False])))
    _close(outs["flash"], outs["xla"])


def test_flash_skips_key_blocks_past_every_row():
    """Rows whose keys stop at a block boundary skip the later blocks (the unconditional half of
    batched guidance): NaN keys and values there would poison any masked product (0 * NaN) but
    must not reach the output. Key blocks of 16 (tile = one row's 2 heads): the 48-key row skips
    nothing, the 32-key row its last block, the 16-key row two, the 20-key row masks its second
    block and skips the third. Also a one-block call of 512 keys, which runs as two halves so the
    256-key row skips its second."""
    for (lk, lengths, kb) in ((48, [48, 32, 16, 20], 16), (512, [256, 512], 1024)):
        q, k, v = _qkv(lk, len(lengths), 8, lk, 2, 8)
        cfg = AttentionConfig("flash", flash_query_block=8, flash_kv_block=kb, flash_tile_elements=8 * 16 * 2)
        lengths = jnp.asarray(lengths)
        past = (jnp.arange(lk)[None, :] >= lengths[:, None])[:, :, None, None]
        k_nan, v_nan = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
        got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, cfg, kv_lengths=lengths))(q, k_nan, v_nan)
        if lk == 48:  # the masked block of the 20-key row multiplies NaN values by 0
            assert np.isnan(np.asarray(got)[3]).all()
            got, lengths_ok = got[:3], slice(0, 3)
        else:
            lengths_ok = slice(None)
        assert np.isfinite(np.asarray(got)).all()
        want = dot_product_attention(q, k, v, AttentionConfig("xla"), kv_lengths=lengths)[lengths_ok]
        _close(got, want)


def test_flash_splits_the_batch_over_the_ambient_mesh(devices):
    """Under ``jax.set_mesh``, the flash loop runs per device on its own batch rows: the same
    numbers as one device, the output stays batch-sharded and the compiled program moves no data
    between devices (GSPMD alone gathered every row to every device: it cannot split a loop that
    walks the sharded axis)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from anim_jax import parallel

    q, k, v = _qkv(3, 8, 24, 40, 2, 8)
    lengths = jnp.asarray([40, 20] * 4)
    cfg = AttentionConfig("flash", flash_query_block=8, flash_kv_block=16, flash_tile_elements=256)
    fn = jax.jit(lambda q, k, v, n: dot_product_attention(q, k, v, cfg, kv_lengths=n))
    want = fn(q, k, v, lengths)
    mesh = parallel.make_mesh((4, 2), ("data", "fsdp"))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(x, rows) for x in (q, k, v, lengths)]
    with jax.set_mesh(mesh):
        got = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    assert got.sharding.spec[0] == ("data", "fsdp")
    assert not re.search(r"all-gather|all-to-all|all-reduce|collective-permute", hlo)
    _close(got, want)


def test_masked_rows_trade_halves_between_devices(devices):
    """Batched guidance puts every unconditional row (it skips the reference keys) on the first
    half of the devices; with kv_lengths the devices trade the second half of their rows with the
    device half the mesh away before the flash loop and trade the outputs back: the same numbers,
    the output where it was, and the only data moved between devices is that trade."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from anim_jax import parallel

    q, k, v = _qkv(4, 16, 24, 40, 2, 8)
    lengths = jnp.asarray([20] * 8 + [40] * 8)  # 16 rows: 4 per device, the short ones on devices 0-1
    cfg = AttentionConfig("flash", flash_query_block=8, flash_kv_block=20, flash_tile_elements=8 * 20 * 2)
    fn = jax.jit(lambda q, k, v, n: dot_product_attention(q, k, v, cfg, kv_lengths=n))
    want = dot_product_attention(q, k, v, AttentionConfig("xla"), kv_lengths=lengths)
    mesh = parallel.make_mesh((4,), ("data",), devices=devices[:4])
    rows = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, rows) for x in (q, k, v, lengths)]
    with jax.set_mesh(mesh):
        got = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    assert got.sharding.spec[0] == "data"
    assert "collective-permute" in hlo and not re.search(r"all-gather|all-to-all|all-reduce", hlo)
    _close(got, want)


@pytest.mark.parametrize("groups", [1, 2, 6])  # one context for all rows, per video, per frame
def test_cross_attention_to_one_token_equals_softmax_attention(groups):
    """One context token (the CLIP embedding) takes a shortcut (every query gets its value); it
    equals the full to_q / scores / softmax / to_out computation, in float64 numpy."""
    attn = Attention(16, heads=2, dim_head=8, context_dim=12, rngs=nnx.Rngs(3))
    r = np.random.default_rng(groups)
    x = jnp.asarray(r.standard_normal((6, 10, 16)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((groups, 1, 12)), jnp.float32)
    got = np.asarray(attn(x, ctx))
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    xn = np.asarray(x, np.float64)
    cn = np.repeat(np.asarray(ctx, np.float64), 6 // groups, axis=0)
    q, k, v = (xn @ w(attn.to_q)).reshape(6, 10, 2, 8), (cn @ w(attn.to_k)).reshape(6, 1, 2, 8), (cn @ w(attn.to_v)).reshape(6, 1, 2, 8)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(6, 10, 16) @ w(attn.to_out) + np.asarray(attn.to_out.bias[...])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_block", [16, 4096])  # several key blocks (online softmax); one block
def test_flash_gradients_equal_plain(kv_block):
    q, k, v = _qkv(5, 2, 20, 45, 2, 8)
    lengths = jnp.asarray([45, 17])
    cfg = AttentionConfig("flash", flash_query_block=6, flash_kv_block=kv_block, flash_tile_elements=100)

    def loss(c):
        return lambda q, k, v: (dot_product_attention(q, k, v, c, kv_lengths=lengths) ** 2).sum()

    got = jax.jit(jax.grad(loss(cfg), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(AttentionConfig("xla")), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4, rtol=1e-4)


def _largest_f32_buffer(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return max(math.prod(int(n) for n in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", text))


def test_flash_never_holds_the_score_matrix():
    s = jax.ShapeDtypeStruct
    q, kv = s((4, 512, 2, 16), jnp.float32), s((4, 1024, 2, 16), jnp.float32)
    scores = 4 * 2 * 512 * 1024
    plain = _largest_f32_buffer(lambda q, k, v: dot_product_attention(q, k, v, AttentionConfig("xla")), q, kv, kv)
    assert plain >= scores  # the plain path does build it: the check below can see one
    cfg = AttentionConfig("flash", flash_query_block=64, flash_kv_block=256, flash_tile_elements=2**14)
    flash = _largest_f32_buffer(lambda q, k, v: dot_product_attention(q, k, v, cfg), q, kv, kv)
    assert flash <= 4 * 1024 * 2 * 16  # nothing larger than k or v themselves


def _ynnpack_fusions(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(kind, output dims)`` of every fusion a compiled CPU program hands YNNPACK: kind "reduce"
    when its computation reduces, "dot" when it multiplies matrices, else "other"."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        if head := re.match(r"(?:ENTRY )?%([\w.\-]+) \(", line):
            name = head.group(1)
            bodies[name] = []
        elif name and line.startswith("  "):
            bodies[name].append(line)
    found = []
    for line in (text for lines in bodies.values() for text in lines):
        if '"__ynn_fusion"' not in line:
            continue
        dims = tuple(int(n) for n in re.search(r"= f32\[([\d,]*)\]", line).group(1).split(",") if n)
        body = "\n".join(bodies[re.search(r"calls=%([\w.\-]+)", line).group(1)])
        found.append(("reduce" if " reduce(" in body else "dot" if " dot(" in body else "other", dims))
    return found


def test_flash_on_a_cpu_mesh_hands_ynnpack_no_reduction_and_no_tall_dot(devices):
    """On a mesh of several CPU devices XLA:CPU keeps ~5 KB for every YNNPACK reduction, and every
    YNNPACK dot of more than 64 rows, that a program runs until it returns (tens of GB over a
    512x512 video; benchmarks/RESULTS.md, "Issue 19, CPU round 15"). There the flash loop takes its
    row maxima and sums without YNNPACK and query blocks of ``flash_cpu_mesh_query_block`` rows;
    the same call off the mesh hands YNNPACK both (so the check can see them)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from anim_jax import parallel

    s = jax.ShapeDtypeStruct
    cfg = AttentionConfig("flash")  # query blocks of 128, as the pipeline runs it
    fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, cfg))
    shapes = ((8, 512, 2, 16), (8, 1024, 2, 16), (8, 1024, 2, 16))
    off = _ynnpack_fusions(fn.lower(*(s(x, jnp.float32) for x in shapes)).compile().as_text())
    assert "reduce" in {kind for kind, _ in off}
    assert max(dims[-2] for kind, dims in off if kind == "dot") == 128
    mesh = parallel.make_mesh((2,), ("data",), devices[:2])
    rows = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
        on = _ynnpack_fusions(fn.lower(*(s(x, jnp.float32, sharding=rows) for x in shapes)).compile().as_text())
    assert {kind for kind, _ in on} == {"dot"}
    assert max(dims[-2] for _, dims in on) == cfg.flash_cpu_mesh_query_block == 64


def test_auto_policy_by_backend_and_size():
    s = jax.ShapeDtypeStruct
    cfg = AttentionConfig("auto")
    big_q, big_k = s((24, 1024, 2, 16), jnp.float32), s((24, 2048, 2, 16), jnp.float32)
    temporal = s((8192, 24, 2, 32), jnp.float32)  # many short sequences: scores no larger than q
    assert _auto_implementation(big_q, big_k, cfg, "cpu") == "flash"
    assert _auto_implementation(temporal, temporal, cfg, "cpu") == "xla"
    assert _auto_implementation(s((1, 16, 2, 16), jnp.float32), s((1, 128, 2, 16), jnp.float32), cfg, "cpu") == "xla"
    half = s((24, 1024, 2, 16), jnp.bfloat16)
    assert _auto_implementation(half, s((24, 2048, 2, 16), jnp.bfloat16), cfg, "gpu") == "cudnn"
    assert _auto_implementation(big_q, big_k, cfg, "gpu") == "xla"


@pytest.mark.parametrize("field", ["flash_query_block", "flash_kv_block", "flash_tile_elements",
                                   "flash_cpu_mesh_query_block"])
def test_flash_config_rejects_non_positive_blocks(field):
    with pytest.raises(ValueError, match=field):
        AttentionConfig("flash", **{field: 0})


@pytest.mark.parametrize("impl", ["xla", "chunked", "flash", "auto"])
def test_heads_first_layout_equals_softmax_attention(impl):
    """The (B, H, L, D) entry point (the temporal attention's) against softmax(q k^T / sqrt(d)) v in
    float64 numpy, for every CPU implementation (flash with blocks small enough to loop)."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in _qkv(7, 3, 24, 24, 4, 8, 12))  # (B, H, L, D)
    cfg = AttentionConfig(impl, query_chunk_size=10, flash_query_block=5, flash_kv_block=10, flash_tile_elements=50)
    got = jax.jit(attention_ops.dot_product_attention_heads_first, static_argnums=3)(q, k, v, cfg)
    qn, kn, vn = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.einsum("bhqd,bhkd->bhqk", qn, kn) / math.sqrt(qn.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), vn)
    assert got.shape == want.shape
    _close(got, want)
