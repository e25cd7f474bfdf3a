"""Spatial transformer pieces with diffusers' names: Attention, FeedForward (GEGLU),
BasicTransformerBlock, Transformer2DModel — plus Animate Anyone's reference attention.

Frames are folded into the batch (``N = B*F``, index ``b*F + f``). Anything shared by the frames of
a video — the cross-attention context and the reference tokens — is passed once per video with a
leading batch of B (or 1, shared by every video) and broadcast here, never stored F times.

Reference attention (Moore-AnimateAnyone's ``ReferenceAttentionControl`` in read mode, written as
explicit data flow): in ``attn1`` the queries are the frame's own ``norm1`` tokens and the keys /
values are ``concat([frame tokens, reference tokens], axis=1)``, all through the same ``attn1``
weights. Projecting the concatenation equals concatenating the projections, so the reference part
can be projected once per video (``Attention.project_kv`` -> ``ReferenceKV``) and reused at every
timestep.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models import layers, row_chunks
from anim_jax.models.attention_ops import AttentionConfig, dot_product_attention


class ReferenceKV(NamedTuple):
    """Reference tokens already projected by one block's ``attn1.to_k``/``to_v``: each
    ``(B or 1, Lr, heads, head_dim)``. A pytree, so it passes through ``jax.jit``.

    ``enabled`` (optional, bool ``(B or 1,)``): per video, whether its frames attend to the
    reference. A disabled video gets plain self-attention: its reference keys are masked out
    (probability exactly 0), which is how training switches reference attention off for its
    unconditional samples without a second forward pass. None: always enabled."""

    k: jax.Array
    v: jax.Array
    enabled: jax.Array | None = None


def per_frame(t: jax.Array, n: int, num_frames: int) -> jax.Array:
    """Broadcast a per-video tensor ``(B or 1, ...)`` to the folded frame batch ``(n = B*F, ...)``."""
    b = n // num_frames
    if n % num_frames or t.shape[0] not in (1, b):
        raise ValueError(
            f"a per-video tensor of batch {t.shape[0]} does not fit {n} rows of {num_frames} frames each "
            f"(expected batch {b} or 1)"
        )
    return jnp.broadcast_to(t[:, None], (b, num_frames) + t.shape[1:]).reshape((n,) + t.shape[1:])


def _context_groups(context: jax.Array, n: int) -> int:
    """How many contexts cross-attention gets for ``n`` rows (each shared by n / G consecutive rows)."""
    g = context.shape[0]
    if n % g:
        raise ValueError(f"context batch {g} does not divide the {n} rows of the input")
    return g


class Attention(nnx.Module):
    """diffusers ``Attention``: ``to_q``/``to_k``/``to_v`` (no bias by default), ``to_out.0`` (bias),
    scale ``head_dim**-0.5``; the maths is ``attention_ops.dot_product_attention``."""

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        attention: AttentionConfig = AttentionConfig(),
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = layers.Linear(query_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_k = layers.Linear(context_dim or query_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_v = layers.Linear(context_dim or query_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_out = layers.Linear(inner, query_dim, axes=("heads", "embed"), **kw)
        self.heads = heads
        self.attention = attention

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[:-1] + (self.heads, x.shape[-1] // self.heads))

    def project_kv(self, x: jax.Array) -> ReferenceKV:
        """Tokens (..., L, Cin) -> keys and values (..., L, heads, head_dim)."""
        return ReferenceKV(self._split_heads(self.to_k(x)), self._split_heads(self.to_v(x)))

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        num_frames: int = 1,
        extra_kv: ReferenceKV | None = None,
    ) -> jax.Array:
        """x (N, L, C) with N = B*num_frames.

        context None: self-attention; ``extra_kv`` (per video, see ``ReferenceKV``) is appended to
        every frame's keys/values. context (G, Lc, Dc) with G dividing N (G = B: one context per
        video; G = 1: one for all; G = N: one per frame): cross-attention, where consecutive
        groups of N/G rows share one context, so their queries are attended in one call instead
        of repeating the context.
        """
        n, length, _ = x.shape
        if context is not None and context.shape[1] == 1 and extra_kv is None:
            return self._one_key_attention(context, n, length)
        q = self._split_heads(self.to_q(x))
        if context is None:
            k, v, _ = self.project_kv(x)
            kv_lengths = None
            if extra_kv is not None:
                k = jnp.concatenate([k, per_frame(extra_kv.k.astype(k.dtype), n, num_frames)], axis=1)
                v = jnp.concatenate([v, per_frame(extra_kv.v.astype(v.dtype), n, num_frames)], axis=1)
                if extra_kv.enabled is not None:
                    enabled = per_frame(jnp.reshape(extra_kv.enabled, (-1,)), n, num_frames)
                    kv_lengths = length + extra_kv.k.shape[1] * enabled.astype(jnp.int32)
            out = dot_product_attention(q, k, v, self.attention, kv_lengths=kv_lengths)
        else:
            if extra_kv is not None:
                raise ValueError("extra keys/values are only defined for self-attention")
            g = _context_groups(context, n)
            k, v, _ = self.project_kv(context)
            q = q.reshape((g, (n // g) * length) + q.shape[2:])
            out = dot_product_attention(q, k, v, self.attention).reshape((n, length) + q.shape[2:])
        return self.to_out(out.reshape(n, length, -1))

    def _one_key_attention(self, context: jax.Array, n: int, length: int) -> jax.Array:
        """Cross-attention to one token (the CLIP image embedding): a softmax over one key is exactly
        1, so every query gets that token's value. ``to_out(to_v(token))`` once per context, then
        broadcast, skips the query projection, the scores and ``to_out`` over all n x length rows."""
        g = _context_groups(context, n)
        out = self.to_out(self.to_v(context))  # (G, 1, C)
        out = jnp.broadcast_to(out[:, None], (g, n // g, length, out.shape[-1]))
        return out.reshape(n, length, -1)


class FeedForward(nnx.Module):
    """GEGLU feed-forward: ``proj`` d -> 2*inner split into [value, gate], ``value * gelu(gate)``
    (exact erf GELU), ``out`` inner -> d. PyTorch names: ``ff.net.0.proj`` and ``ff.net.2``."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = layers.Linear(dim, 2 * inner, axes=("embed", "mlp"), **kw)
        self.out = layers.Linear(inner, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(value * jax.nn.gelu(gate, approximate=False))


Reference = ReferenceKV | None


class BasicTransformerBlock(nnx.Module):
    """norm1 -> attn1 (self, + reference) -> norm2 -> attn2 (cross to context) -> norm3 -> ff,
    each with a residual (diffusers ``BasicTransformerBlock``, layer_norm type)."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        context_dim: int,
        attention: AttentionConfig = AttentionConfig(),
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.LayerNorm(dim, param_dtype=param_dtype)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, attention=attention, **kw)
        self.norm2 = layers.LayerNorm(dim, param_dtype=param_dtype)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head, context_dim=context_dim, attention=attention, **kw)
        self.norm3 = layers.LayerNorm(dim, param_dtype=param_dtype)
        self.ff = FeedForward(dim, **kw)
        self.attention = attention

    def __call__(
        self, x: jax.Array, context: jax.Array, *, num_frames: int = 1, reference: Reference = None
    ) -> tuple[jax.Array, jax.Array]:
        """x (N, L, C). reference: None (plain self-attention) or the reference tokens already
        projected by this block's ``attn1`` (``ReferenceKV``). Returns (output, norm1 output) — the
        latter is what a ReferenceNet hands to the denoiser."""
        n = self.norm1(x)
        if reference is not None and not isinstance(reference, ReferenceKV):
            raise TypeError(
                f"reference attention takes projected keys/values (ReferenceKV, from the denoiser's "
                f"reference_kv), got {type(reference).__name__}"
            )
        x = self.attn1(n, num_frames=num_frames, extra_kv=reference) + x
        x = self.attn2(self.norm2(x), context, num_frames=num_frames) + x
        # On the CPU the feed-forward runs over chunks of tokens (its 8x-wide projection stays in cache)
        tokens = row_chunks.apply(lambda t: self.ff(self.norm3(t)) + t, x.reshape(-1, x.shape[-1]), self.attention,
                                  row_width=8 * x.shape[-1])
        return tokens.reshape(x.shape), n


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6, per frame) -> proj_in -> transformer_blocks -> proj_out -> + input.

    ``proj_in``/``proj_out`` are 1x1 convs, or Linear with ``use_linear_projection``; on
    channels-last tensors both are the same matmul and differ only in the parameter's shape.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        heads: int,
        dim_head: int,
        context_dim: int,
        num_layers: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
        attention: AttentionConfig = AttentionConfig(),
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * dim_head
        self.norm = layers.GroupNorm(groups, in_channels, eps=1e-6, param_dtype=param_dtype)
        if use_linear_projection:
            self.proj_in = layers.Linear(in_channels, inner, axes=("embed", "mlp"), **kw)
            self.proj_out = layers.Linear(inner, in_channels, axes=("mlp", "embed"), **kw)
        else:
            self.proj_in = layers.Conv2d(in_channels, inner, 1, **kw)
            self.proj_out = layers.Conv2d(inner, in_channels, 1, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(inner, heads=heads, dim_head=dim_head, context_dim=context_dim, attention=attention, **kw)
                for _ in range(num_layers)
            ]
        )

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        reference: Mapping[str, Reference] | None = None,
        *,
        num_frames: int = 1,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x (N, H, W, C); reference: ``{"transformer_blocks.<j>": ReferenceKV or None}`` (a block
        without an entry does plain self-attention), or None.
        Returns (output, {"transformer_blocks.<j>": norm1 output of that block, (N, H*W, inner)})."""
        n, h, w, _ = x.shape
        y = self.proj_in(self.norm(x))
        y = y.reshape(n, h * w, y.shape[-1])
        reference = reference or {}
        feats = {}
        for j, block in enumerate(self.transformer_blocks):
            y, feats[f"transformer_blocks.{j}"] = block(y, context, num_frames=num_frames,
                                                         reference=reference.get(f"transformer_blocks.{j}"))
        y = self.proj_out(y.reshape(n, h, w, y.shape[-1]))
        return y + x, feats
