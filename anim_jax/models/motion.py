"""AnimateDiff "Vanilla" motion module (temporal transformer), as used by AnimateDiff v1/v2 and Moore.

On a video ``x`` of shape (B, F, H, W, C) (Moore-AnimateAnyone ``src/models/motion_module.py``,
AnimateDiff ``animatediff/models/motion_module.py``)::

    h = GroupNorm(groups, eps=1e-6)(x)         per frame: the original folds frames into the batch
    h = proj_in(tokens(h))                     Linear C->C; tokens are (B*H*W, F, C): one sequence
                                               over the frames for every spatial location
    for each transformer block, for each attention block k:
        n = norms[k](h) + PE[:F]               LayerNorm, then the sinusoidal position encoding
        h = attention_blocks[k](n) + h         self-attention over frames; the residual has no PE
    h = ff(ff_norm(h)) + h                     GEGLU C -> 4C -> C (exact erf GELU)
    out = x + proj_out(h)                      Linear C->C

The PE is ``pe[p, 2i] = sin(p / 10000^(2i/C))``, ``pe[p, 2i+1] = cos(...)`` with p = 0 at the first
frame of the window. It is not a parameter: it is recomputed here, and the checkpoint's buffers are
only validated (``check_pe_buffers``). Windows longer than ``temporal_position_encoding_max_len`` are
an error, as they are impossible in the original.

diffusers' ``AnimateDiffTransformer3D`` differs in one place: its GroupNorm runs on the 5-D
(B, C, F, H, W) tensor, so its statistics are pooled over all frames. We follow the original (and
Moore), which normalises each frame on its own; for F = 1 the two agree.

Parameter names follow the original checkpoint format (``temporal_transformer.transformer_blocks.0.
attention_blocks.0.to_q`` ...); ``anim_jax.convert.motion_keys`` maps them to both checkpoint formats and
``anim_jax.convert.model_configs`` reads a ``MotionConfig`` from a checkpoint or Moore's yaml.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anim_jax.models import row_chunks
from anim_jax.models.attention_ops import AttentionConfig, dot_product_attention_heads_first
from anim_jax.models.layers import Dtype, GroupNorm, LayerNorm, Linear
from anim_jax.models.transformer import FeedForward

SUPPORTED_ATTENTION_BLOCK_TYPES = ("Temporal_Self",)


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """The ``motion_module_kwargs`` of AnimateDiff/Moore plus where the UNet places the modules.

    Placement (read by the UNet): ``levels`` are UNet resolution levels (0 = full latent resolution;
    Moore's ``motion_module_resolutions`` [1,2,4,8] are levels 0..3); a down block at level i and the
    up block at the same resolution carry modules; ``use_mid_block`` adds one in the mid block
    (AnimateDiff v2 and Moore: True; v1: False). ``decoder_only`` exists for the yaml's sake and must
    be False. ``zero_initialize`` zeroes ``proj_out`` at construction, like the original, so a fresh
    module is the identity.
    """

    num_attention_heads: int = 8
    num_transformer_block: int = 1
    attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    temporal_position_encoding: bool = True
    temporal_position_encoding_max_len: int = 32
    temporal_attention_dim_div: int = 1
    norm_num_groups: int = 32
    zero_initialize: bool = True
    use_mid_block: bool = True
    decoder_only: bool = False
    levels: tuple[int, ...] = (0, 1, 2, 3)

    def __post_init__(self):
        object.__setattr__(self, "attention_block_types", tuple(self.attention_block_types))
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        bad = [t for t in self.attention_block_types if t not in SUPPORTED_ATTENTION_BLOCK_TYPES]
        if bad or not self.attention_block_types:
            raise ValueError(
                f"MotionConfig.attention_block_types={self.attention_block_types!r}: only "
                f"{SUPPORTED_ATTENTION_BLOCK_TYPES} blocks are supported (AnimateDiff v1/v2, Moore)"
            )
        for name in ("num_attention_heads", "num_transformer_block", "temporal_position_encoding_max_len", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MotionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.temporal_attention_dim_div != 1:
            raise ValueError(
                f"MotionConfig.temporal_attention_dim_div={self.temporal_attention_dim_div}: only 1 is supported"
            )
        if self.decoder_only:
            raise ValueError("MotionConfig.decoder_only=True is not supported (AnimateDiff v1/v2 and Moore use False)")
        # The upper bound is the UNet's level count, checked by UNetConfig.
        if len(set(self.levels)) != len(self.levels) or any(v < 0 for v in self.levels):
            raise ValueError(f"MotionConfig.levels={self.levels}: expected distinct non-negative UNet levels")

    @property
    def num_attention_blocks(self) -> int:
        return len(self.attention_block_types)



def sinusoidal_position_table(length: int, channels: int) -> np.ndarray:
    """(length, channels) float32 table; the original's ``PositionalEncoding`` computed the same way
    (float32, interleaved: even channels sin, odd channels cos)."""
    if channels % 2:
        raise ValueError(f"the sinusoidal position encoding needs an even channel count, got {channels}")
    position = np.arange(length, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, channels, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / channels))
    pe = np.zeros((length, channels), np.float32)
    pe[:, 0::2] = np.sin(position * div_term)
    pe[:, 1::2] = np.cos(position * div_term)
    return pe


def check_pe_buffers(state_dict: Mapping[str, Any], config: MotionConfig, *, atol: float = 1e-5) -> int:
    """Validates every ``pos_encoder.pe`` / ``pos_embed.pe`` buffer against the formula; returns how
    many were checked. A wrong shape, a ``max_len`` other than the config's, or any value off by more
    than ``atol`` is a ValueError naming the key."""
    checked = 0
    for key, value in state_dict.items():
        if not key.endswith(("pos_encoder.pe", "pos_embed.pe")):
            continue
        if not config.temporal_position_encoding:
            raise ValueError(f"{key}: checkpoint has a position encoding but the config disables it")
        pe = np.asarray(value, dtype=np.float32)
        if pe.ndim != 3 or pe.shape[0] != 1:
            raise ValueError(f"{key}: expected a (1, max_len, channels) buffer, got shape {pe.shape}")
        max_len = config.temporal_position_encoding_max_len
        if pe.shape[1] != max_len:
            raise ValueError(
                f"{key}: position encoding of length {pe.shape[1]}, config temporal_position_encoding_max_len={max_len}"
            )
        err = float(np.max(np.abs(pe[0] - sinusoidal_position_table(max_len, pe.shape[2]))))
        if not err <= atol:
            raise ValueError(f"{key}: differs from the sinusoidal formula by {err:.3g} (> {atol:g})")
        checked += 1
    return checked


class TemporalSelfAttention(nnx.Module):
    """Self-attention over the frame axis of (N, F, C) tokens (N = batch x spatial positions)."""

    def __init__(self, dim: int, heads: int, *, attention: AttentionConfig, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = Linear(dim, dim, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_k = Linear(dim, dim, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_v = Linear(dim, dim, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_out = Linear(dim, dim, axes=("heads", "embed"), **kw)
        self.heads = heads
        self.attention = attention

    def __call__(self, x: jax.Array) -> jax.Array:
        n, f, c = x.shape
        h = self.heads
        dtype = self.to_q.dtype or x.dtype
        # One projection writes q, k and v straight in (N, heads, F, head_dim), the layout whose
        # batched dots need no transposes; with (N, F, heads, head_dim) tensors XLA copied q, k, v
        # and the output around each of these tiny 24 x 24 attentions (benchmarks/RESULTS.md).
        w = jnp.concatenate([self.to_q.kernel[...], self.to_k.kernel[...], self.to_v.kernel[...]], axis=1)
        qkv = jnp.einsum("nfc,cthd->tnhfd", x.astype(dtype), w.astype(dtype).reshape(c, 3, h, c // h))
        out = dot_product_attention_heads_first(qkv[0], qkv[1], qkv[2], self.attention)
        wo = self.to_out.kernel[...].astype(dtype).reshape(h, c // h, c)
        return jnp.einsum("nhfd,hdc->nfc", out, wo) + self.to_out.bias[...].astype(dtype)


class TemporalTransformerBlock(nnx.Module):
    def __init__(self, dim: int, config: MotionConfig, *, attention, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = config.num_attention_blocks
        self.attention_blocks = nnx.List(
            [TemporalSelfAttention(dim, config.num_attention_heads, attention=attention, **kw) for _ in range(n)]
        )
        self.norms = nnx.List([LayerNorm(dim, param_dtype=param_dtype) for _ in range(n)])
        self.ff = FeedForward(dim, **kw)
        self.ff_norm = LayerNorm(dim, param_dtype=param_dtype)

    def __call__(self, h: jax.Array, pe: jax.Array | None) -> jax.Array:
        for attn, norm in zip(self.attention_blocks, self.norms):
            n = norm(h)
            if pe is not None:
                n = n + pe.astype(n.dtype)
            h = attn(n) + h
        return self.ff(self.ff_norm(h)) + h


class TemporalTransformer3D(nnx.Module):
    def __init__(self, channels: int, config: MotionConfig, *, attention, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(config.norm_num_groups, channels, eps=1e-6, param_dtype=param_dtype)
        self.proj_in = Linear(channels, channels, axes=("embed", "mlp"), **kw)
        self.transformer_blocks = nnx.List(
            [
                TemporalTransformerBlock(channels, config, attention=attention, **kw)
                for _ in range(config.num_transformer_block)
            ]
        )
        self.proj_out = Linear(channels, channels, axes=("mlp", "embed"), **kw)
        self.config = config
        self.attention = attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, hh, ww, c = x.shape
        cfg = self.config
        pe = None
        if cfg.temporal_position_encoding:
            if f > cfg.temporal_position_encoding_max_len:
                raise ValueError(
                    f"motion module: a window of {f} frames is longer than the position encoding "
                    f"(temporal_position_encoding_max_len={cfg.temporal_position_encoding_max_len})"
                )
            pe = jnp.asarray(sinusoidal_position_table(f, c))
        h = self.norm(x.reshape(b * f, hh, ww, c))  # per-frame statistics
        h = h.reshape(b, f, hh * ww, c).swapaxes(1, 2).reshape(b * hh * ww, f, c)

        def per_position(h):
            h = self.proj_in(h)
            for block in self.transformer_blocks:
                h = block(h, pe)
            return self.proj_out(h)

        # every position's frames are one row (the feed-forward's projection, 8x the channels per
        # frame, is its widest intermediate)
        h = row_chunks.apply(per_position, h, self.attention, row_width=8 * f * c)
        h = h.reshape(b, hh * ww, f, c).swapaxes(1, 2).reshape(b, f, hh, ww, c)
        return (h + x).astype(x.dtype)


class MotionModule(nnx.Module):
    """One AnimateDiff ``VanillaTemporalModule``: (B, F, H, W, C) -> (B, F, H, W, C).

    With ``config.zero_initialize`` (the default, like the original) ``proj_out`` starts at zero,
    so a freshly built module is the identity; checkpoints overwrite it.
    """

    def __init__(
        self,
        channels: int,
        config: MotionConfig = MotionConfig(),
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        attention: AttentionConfig | None = None,
        rngs: nnx.Rngs,
    ):
        if channels % config.num_attention_heads:
            raise ValueError(
                f"motion module: {channels} channels are not divisible by num_attention_heads={config.num_attention_heads}"
            )
        self.channels = channels
        self.temporal_transformer = TemporalTransformer3D(
            channels, config, attention=attention or AttentionConfig(), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        if config.zero_initialize:
            proj_out = self.temporal_transformer.proj_out
            proj_out.kernel[...] = jnp.zeros_like(proj_out.kernel[...])
            proj_out.bias[...] = jnp.zeros_like(proj_out.bias[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 5 or x.shape[-1] != self.channels:
            raise ValueError(f"motion module expects (B, F, H, W, {self.channels}); got {x.shape}")
        return self.temporal_transformer(x)
