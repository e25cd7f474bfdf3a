"""The one attention function every attention layer calls.

Layout is ``(batch, length, heads, head_dim)`` for q, k and v (the layout of
``jax.nn.dot_product_attention``). The implementation is a config choice:

* ``"xla"``: einsum -> float32 softmax -> einsum. Exact reference; the default.
* ``"chunked"``: the same maths over query chunks (``jax.lax.map``), so the score matrix held at
  once is ``chunk x Lk`` instead of ``Lq x Lk``. This is what makes the reference-concat
  self-attention at the top UNet level fit (one unfused score matrix there is tens of GB).
* ``"flash"``: online softmax over tiles (flash-attention's order of work written with XLA loops):
  a loop over tiles of (batch x head) groups and query blocks, and inside it a loop over key blocks
  that keeps a running max, denominator and output. The score tile held at once is at most
  ``flash_tile_elements`` (plus a whole key block of one query block if that is larger), so it stays
  in the CPU's caches however long the sequences are; the backward recomputes each tile. With
  ``kv_lengths``, key blocks past every row of a tile are skipped and blocks inside every row's
  keys run unmasked. Under a mesh (``jax.set_mesh``) every device loops over its own batch rows
  (with ``kv_lengths``, after trading half of them with another device, so cheap and dear rows mix);
  on several CPU devices in smaller query blocks and with no YNNPACK reductions, which XLA:CPU would
  otherwise hold memory for until the program returns (``flash_cpu_mesh_query_block``).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention on
  NVIDIA GPUs; needs fp16/bf16 inputs).
* ``"auto"``, by backend:

  - GPU: cuDNN for half-precision inputs whose key sequence is at least ``fused_min_kv_length``
    long (short ones — the 24-frame temporal attention, the single CLIP token — are cheaper as plain
    XLA than as a fused kernel launch per tiny problem); otherwise chunked once the score matrix
    would exceed ``chunk_threshold`` elements per batch-head, otherwise xla.
  - CPU: flash once the key sequence is at least ``fused_min_kv_length`` long and the whole score
    matrix (all batches and heads) would exceed ``flash_min_elements``; otherwise xla. Short key
    sequences keep the plain path: their score matrix is no larger than q, k and v themselves.
  - other backends: as GPU without the cuDNN case.

``kv_lengths`` (optional, int (B,)) makes batch row b attend only to its first ``kv_lengths[b]``
keys: the others get a -inf logit, i.e. probability exactly 0. Training uses it to switch reference
attention off per sample (the reference keys come after the frame's own keys).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from anim_jax.models import row_chunks

IMPLEMENTATIONS = ("xla", "chunked", "flash", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    implementation: str = "xla"
    query_chunk_size: int = 1024
    # "auto" switches to the chunked path above this many score elements per (batch, head).
    chunk_threshold: int = 4096 * 4096
    fused_min_kv_length: int = 128
    # "flash": queries per block, keys per block, and the most score elements one tile may hold
    # (4 bytes each in float32: 2**18 is 1 MiB, half a core's L2 on the CPUs measured).
    flash_query_block: int = 128
    flash_kv_block: int = 1024
    flash_tile_elements: int = 2**18
    # "flash" on a mesh of several CPU devices: query blocks of at most this many rows, and row maxima
    # and sums XLA computes itself. There XLA:CPU keeps ~5 KB for every YNNPACK reduction, and every
    # YNNPACK dot of more than 64 rows, that a program runs until the program returns: the tile loops
    # run hundreds of thousands a step (benchmarks/RESULTS.md, "Issue 19, CPU round 15").
    flash_cpu_mesh_query_block: int = 64
    # "auto" on CPU switches to flash above this many score elements in one call (1 MiB in fp32):
    # measured faster than the plain path from there on (benchmarks/RESULTS.md).
    flash_min_elements: int = 2**18
    # "flash" under a mesh (``jax.set_mesh``): the batch rows are split over these of its axes
    # (those it has, when they divide the batch) and each device runs the tile loop on its own rows.
    # GSPMD cannot split a loop whose iterations walk the sharded axis, so without this every device
    # ran the whole attention (benchmarks/RESULTS.md, "Issue 19, CPU round 7").
    flash_batch_axes: tuple[str, ...] = ("data", "fsdp")
    # On CPU backends, row-wise layer stacks (the feed-forward, a motion module's per-position path)
    # run over chunks of rows whose widest intermediate holds at most this many elements
    # (``anim_jax.models.row_chunks``; 0: never). The batch axes are ``flash_batch_axes``.
    row_chunk_elements: int = 2**18

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention implementation {self.implementation!r} is not one of {IMPLEMENTATIONS}"
            )
        if self.query_chunk_size <= 0:
            raise ValueError(f"attention query_chunk_size must be positive, got {self.query_chunk_size}")
        if self.row_chunk_elements < 0:
            raise ValueError(f"attention row_chunk_elements must be >= 0, got {self.row_chunk_elements}")
        for name in ("flash_query_block", "flash_kv_block", "flash_tile_elements", "flash_cpu_mesh_query_block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"attention {name} must be positive, got {getattr(self, name)}")


def _auto_implementation(q, k, config: AttentionConfig, backend: str) -> str:
    """What "auto" runs for these shapes on ``backend`` (see the module docstring)."""
    lk = k.shape[1]
    if backend == "cpu":
        score_elements = q.shape[0] * q.shape[2] * q.shape[1] * lk
        if lk >= config.fused_min_kv_length and score_elements > config.flash_min_elements:
            return "flash"
        return "xla"
    fusable = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    if backend == "gpu" and fusable and lk >= config.fused_min_kv_length:
        return "cudnn"
    if q.shape[1] * lk > config.chunk_threshold:
        return "chunked"
    return "xla"


def _xla_attention(q, k, v, scale, kv_lengths=None):
    # q is scaled before the score product (q elements, not scores), and the output is normalised
    # after the value product (q x d divisions, not q x k): on the CPU up to 2.6x faster than a
    # softmax over the scores at the UNet's shapes, the smallest ones unchanged (benchmarks/RESULTS.md,
    # "Issue 19, CPU round 8").
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if kv_lengths is not None:
        valid = jnp.arange(k.shape[1]) < kv_lengths[:, None]
        scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    # kv_lengths >= 1: every row has a finite maximum.
    p = jnp.exp(scores - scores.max(-1, keepdims=True))
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / p.sum(-1).transpose(0, 2, 1)[..., None]).astype(v.dtype)


def _chunked_attention(q, k, v, scale, chunk, kv_lengths=None):
    lq = q.shape[1]
    if lq <= chunk:
        return _xla_attention(q, k, v, scale, kv_lengths)
    n = math.ceil(lq / chunk)
    pad = n * chunk - lq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qp.reshape(q.shape[0], n, chunk, *q.shape[2:]).swapaxes(0, 1)
    # remat each chunk so the backward pass also holds only one chunk's scores.
    out = jax.lax.map(jax.checkpoint(lambda qi: _xla_attention(qi, k, v, scale, kv_lengths)), qc)
    out = out.swapaxes(0, 1).reshape(q.shape[0], n * chunk, *v.shape[2:])
    return out[:, :lq]


# The shortest key block a one-block call is split into (shorter ones cost more in loop overhead
# than the skipped block saves: benchmarks/RESULTS.md, "Issue 19, CPU round 7").
_MIN_SPLIT_KV_BLOCK = 256


def _row_max(s):
    """``s.max(-1)`` as a tree of elementwise maxima over halves, which XLA fuses into loops of its
    own instead of handing YNNPACK a reduction (see ``flash_cpu_mesh_query_block``)."""
    while s.shape[-1] > 1:
        half = s.shape[-1] // 2
        s = jnp.concatenate([jnp.maximum(s[..., :half], s[..., half : 2 * half]), s[..., 2 * half :]], axis=-1)
    return s[..., 0]


def _row_sum(p):
    """``p.sum(-1)`` as a product with a ones vector, which XLA computes without YNNPACK (see
    ``flash_cpu_mesh_query_block``)."""
    return jnp.einsum("...k,k->...", p, jnp.ones(p.shape[-1], p.dtype), preferred_element_type=jnp.float32)


def _on_cpu_mesh() -> bool:
    """Whether this trace runs on a mesh of several CPU devices (see ``flash_cpu_mesh_query_block``)."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() == "cpu" and not mesh.empty and mesh.size > 1


def _flash_attention(q, k, v, scale, config: AttentionConfig, kv_lengths=None):
    # Hand-written: jax.nn.dot_product_attention has no tiled XLA path (only "xla", which builds
    # the whole score matrix, and "cudnn", GPU only), and no maintained JAX library offers a
    # CPU-friendly tiled attention with per-row key lengths.
    b, lq, h, d = q.shape
    lk, dv = k.shape[1], v.shape[-1]
    g = b * h
    groups = lambda t: t.transpose(0, 2, 1, 3).reshape(g, t.shape[1], t.shape[3])  # (B*H, L, D)
    qg, kg, vg = groups(q), groups(k), groups(v)
    lens = None if kv_lengths is None else jnp.repeat(kv_lengths, h)
    # One device: YNNPACK's reductions and larger blocks are faster (8-10% a 256x256 step).
    cpu_mesh = _on_cpu_mesh()
    row_max = _row_max if cpu_mesh else (lambda s: s.max(-1))
    row_sum = _row_sum if cpu_mesh else (lambda p: p.sum(-1))

    kb = min(config.flash_kv_block, lk)
    if lens is not None and kb == lk and lk % 2 == 0 and lk // 2 >= _MIN_SPLIT_KV_BLOCK:
        # Masked rows usually stop half way (the reference-concat keys: a frame's own tokens, then
        # as many reference tokens); two blocks let them skip the second.
        kb = lk // 2
    nk = -(-lk // kb)
    if nk * kb != lk:  # padded keys are masked out like keys past kv_lengths
        kg = jnp.pad(kg, ((0, 0), (0, nk * kb - lk), (0, 0)))
        vg = jnp.pad(vg, ((0, 0), (0, nk * kb - lk), (0, 0)))
        lens = jnp.full((g,), lk, jnp.int32) if lens is None else lens
    qb = min(config.flash_query_block, config.flash_cpu_mesh_query_block if cpu_mesh else lq, lq)
    nq = -(-lq // qb)
    gt = max(1, min(g, config.flash_tile_elements // (qb * kb)))  # groups per tile
    ng = -(-g // gt)
    qg = jnp.pad(qg, ((0, ng * gt - g), (0, nq * qb - lq), (0, 0)))
    kg = jnp.pad(kg, ((0, ng * gt - g), (0, 0), (0, 0)))
    vg = jnp.pad(vg, ((0, ng * gt - g), (0, 0), (0, 0)))
    if lens is not None:
        lens = jnp.pad(lens, (0, ng * gt - g), constant_values=lk)

    def masked(s, start, lt):
        if lt is None:
            return s
        valid = (start + jnp.arange(s.shape[-1]))[None, :] < lt[:, None]
        return jnp.where(valid[:, None, :], s, -jnp.inf)

    def scores(qt, kt, start, lt):
        # On the CPU (benchmarks/RESULTS.md, "Issue 19, CPU round 4"): the keys come transposed
        # once per tile, so this is a plain (qb, d) x (d, kb) product, and q comes scaled (qb x d
        # products, not qb x kb).
        return masked(jnp.einsum("gqd,gdk->gqk", qt, kt, preferred_element_type=jnp.float32), start, lt)

    def one_query_block(qt, kt, vt, lt):
        """qt (gt, qb, d), scaled; kt (gt, d, nk*kb); vt (gt, nk*kb, dv); lt (gt,) or None -> (gt, qb, dv)."""
        if nk == 1:
            # One key block (short key sequences): the output is normalised after the value
            # product (qb x dv divisions, not qb x kb).
            s = scores(qt, kt, 0, lt)
            p = jnp.exp(s - row_max(s)[..., None])
            out = jnp.einsum("gqk,gkd->gqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
            return (out / row_sum(p)[..., None]).astype(vt.dtype)

        def update(carry, j, lt):
            m, l, acc = carry
            ks = jax.lax.dynamic_slice_in_dim(kt, j * kb, kb, axis=2)
            vs = jax.lax.dynamic_slice_in_dim(vt, j * kb, kb, axis=1)
            s = scores(qt, ks, j * kb, lt)
            m_new = jnp.maximum(m, row_max(s))
            # Key 0 is always valid (kv_lengths >= 1) and block 0 comes first, so m_new is finite
            # from the first block on.
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + row_sum(p)
            pv = jnp.einsum("gqk,gkd->gqd", p.astype(vt.dtype), vs, preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        def step(carry, j):
            if lt is None:
                return update(carry, j, None), None
            # A block past every row's keys would add exp(-inf) = 0 and leave the carry as it is,
            # so it is skipped (the unconditional half of batched guidance skips the reference's
            # blocks); a block inside every row's keys needs no mask.
            start = j * kb
            branch = jnp.where(start >= lt.max(), 0, jnp.where(start + kb <= lt.min(), 1, 2))
            return jax.lax.switch(branch, [lambda c: c, lambda c: update(c, j, None), lambda c: update(c, j, lt)],
                                  carry), None

        init = (jnp.full(qt.shape[:2], -jnp.inf, jnp.float32), jnp.zeros(qt.shape[:2], jnp.float32),
                jnp.zeros(qt.shape[:2] + (dv,), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, jnp.arange(nk))
        return (acc / l[..., None]).astype(vt.dtype)

    # remat each tile so the backward pass also holds only one tile's scores.
    one_query_block = jax.checkpoint(one_query_block)

    def one_group_tile(xs):
        qt, kt, vt, lt = xs  # (gt, nq*qb, d), (gt, Lk', d), (gt, Lk', dv), (gt,) or None
        qblocks = (qt * jnp.asarray(scale, qt.dtype)).reshape(gt, nq, qb, d).swapaxes(0, 1)
        kt = kt.swapaxes(1, 2)
        out = jax.lax.map(lambda qi: one_query_block(qi, kt, vt, lt), qblocks)  # (nq, gt, qb, dv)
        return out.swapaxes(0, 1).reshape(gt, nq * qb, dv)

    tiles = lambda t: t.reshape((ng, gt) + t.shape[1:])
    out = jax.lax.map(one_group_tile, (tiles(qg), tiles(kg), tiles(vg), None if lens is None else tiles(lens)))
    out = out.reshape(ng * gt, nq * qb, dv)[:g, :lq]
    return out.reshape(b, h, lq, dv).transpose(0, 2, 1, 3)


def _trade_halves(fn, axes: tuple[str, ...], devices: int):
    """``fn`` with each device's second half of rows computed on the device half the mesh away.

    Rows with ``kv_lengths`` often come in blocks of unequal cost: batched guidance puts every
    unconditional row (it skips the reference keys: half the work of a conditional row) on the
    first half of the devices, so those waited for the others. After the trade every device holds
    rows of both kinds; the same trade brings the outputs home (shifting by half the devices twice
    is no shift)."""
    perm = [(i, (i + devices // 2) % devices) for i in range(devices)]

    def trade(t):
        half = t.shape[0] // 2
        return jnp.concatenate([t[:half], jax.lax.ppermute(t[half:], axes, perm)])

    return lambda q, k, v, lengths: trade(fn(trade(q), trade(k), trade(v), trade(lengths)))


def _per_device(fn, q, k, v, kv_lengths, *, axes):
    """``fn(q, k, v, kv_lengths)`` with the batch rows split over the ambient mesh's ``axes`` (a
    ``shard_map``: every device runs ``fn`` on its own rows), or as is without a mesh, without those
    axes or when they do not divide the batch. With ``kv_lengths``, on an even number of devices
    each holding an even number of rows, the devices trade halves first (``_trade_halves``)."""
    axes, devices = row_chunks.mesh_row_split(q.shape[0], axes)
    if not axes:
        return fn(q, k, v, kv_lengths)
    mesh = jax.sharding.get_abstract_mesh()
    rows = P(axes)
    if kv_lengths is None:
        local, args = (lambda q, k, v: fn(q, k, v, None)), (q, k, v)
    else:
        balanced = devices % 2 == 0 and (q.shape[0] // devices) % 2 == 0
        local, args = (_trade_halves(fn, axes, devices) if balanced else fn), (q, k, v, kv_lengths)
    # check_vma=False: the loops' carries start as constants; nothing crosses devices but the trade.
    return jax.shard_map(local, mesh=mesh, in_specs=(rows,) * len(args), out_specs=rows, axis_names=set(axes),
                         check_vma=False)(*args)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, config: AttentionConfig | None = None, *, kv_lengths=None
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over (B, L, H, D) tensors; returns (B, Lq, H, D).

    ``kv_lengths``: None, or int (B,) in [1, Lk]: row b ignores keys/values from position
    ``kv_lengths[b]`` on (see the module docstring)."""
    config = config or AttentionConfig()
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (batch, length, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    scale = q.shape[-1] ** -0.5
    impl = config.implementation
    if impl == "auto":
        impl = _auto_implementation(q, k, config, jax.default_backend())
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
        if kv_lengths.shape != (q.shape[0],):
            raise ValueError(f"kv_lengths must have shape ({q.shape[0]},), got {kv_lengths.shape}")
    if impl == "xla":
        return _xla_attention(q, k, v, scale, kv_lengths)
    if impl == "chunked":
        return _chunked_attention(q, k, v, scale, config.query_chunk_size, kv_lengths)
    if impl == "flash":
        flash = lambda q, k, v, lengths: _flash_attention(q, k, v, scale, config, lengths)  # noqa: E731
        return _per_device(flash, q, k, v, kv_lengths, axes=config.flash_batch_axes)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=kv_lengths, implementation="cudnn"
    )


def dot_product_attention_heads_first(
    q: jax.Array, k: jax.Array, v: jax.Array, config: AttentionConfig | None = None
) -> jax.Array:
    """``dot_product_attention`` on (B, H, L, D) tensors; returns (B, H, Lq, D).

    For callers that can produce this layout for free (the temporal attention projects straight
    into it): the plain path then runs its batched dots with (B, H) leading, with no transposes.
    Every other implementation gets the (B, L, H, D) tensors it takes."""
    config = config or AttentionConfig()
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (batch, heads, length, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    to_blhd = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
    impl = config.implementation
    if impl == "auto":
        impl = _auto_implementation(to_blhd(q), to_blhd(k), config, jax.default_backend())
    if impl != "xla":
        out = dot_product_attention(to_blhd(q), to_blhd(k), to_blhd(v), dataclasses.replace(config, implementation=impl))
        return to_blhd(out)
    # Scaled q and normalised after the value product, as in ``_xla_attention``: 2.2x faster on
    # the temporal attention's 24 x 24 scores with head_dim 4.
    scaled = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("bhqd,bhkd->bhqk", scaled, k, preferred_element_type=jnp.float32)
    p = jnp.exp(scores - scores.max(-1, keepdims=True))
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / p.sum(-1)[..., None]).astype(v.dtype)
