"""UNet convolutional pieces with diffusers' names: ResnetBlock2D, Downsample2D, Upsample2D.

Tensors are channels-last. Frames are folded into the batch, ``(B*F, H, W, C)`` with index
``b*F + f``; ``num_frames`` only matters for GroupNorms whose statistics are pooled over the
frames of a video (``over_frames=True``, the original's non-inflated 5-D GroupNorm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models import layers


def frame_group_norm(norm: layers.GroupNorm, x: jax.Array, num_frames: int, over_frames: bool) -> jax.Array:
    """Apply ``norm`` to ``(B*F, H, W, C)``: per frame, or with statistics pooled over the F frames.

    Pooling equals PyTorch ``nn.GroupNorm`` on the 5-D ``(B, C, F, H, W)`` tensor, which the
    AnimateDiff-derived UNet3D uses when ``use_inflated_groupnorm=False``.
    """
    if not over_frames or num_frames == 1:
        return norm(x)
    n, h, w, c = x.shape
    if n % num_frames:
        raise ValueError(f"batch {n} is not a multiple of num_frames={num_frames}")
    return norm(x.reshape(n // num_frames, num_frames * h, w, c)).reshape(x.shape)


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` (time_scale_shift "default", SiLU, output scale 1, no dropout)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        groups: int,
        eps: float,
        groupnorm_over_frames: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.GroupNorm(groups, in_channels, eps=eps, param_dtype=param_dtype)
        self.conv1 = layers.Conv2d(in_channels, out_channels, 3, **kw)
        self.time_emb_proj = layers.Linear(temb_channels, out_channels, axes=("mlp", "embed"), **kw)
        self.norm2 = layers.GroupNorm(groups, out_channels, eps=eps, param_dtype=param_dtype)
        self.conv2 = layers.Conv2d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = layers.Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        self.groupnorm_over_frames = groupnorm_over_frames

    def __call__(self, x: jax.Array, temb: jax.Array, num_frames: int = 1) -> jax.Array:
        """x (N, H, W, Cin), temb (N, Ct) -> (N, H, W, Cout)."""
        h = jax.nn.silu(frame_group_norm(self.norm1, x, num_frames, self.groupnorm_over_frames))
        h = self.conv1(h)
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = jax.nn.silu(frame_group_norm(self.norm2, h, num_frames, self.groupnorm_over_frames))
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Conv 3x3, stride 2, padding 1 (``downsamplers.0.conv``)."""

    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = layers.Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest upsampling to ``out_hw`` (the skip connection's size; default 2x) with PyTorch's
    floor indexing, then conv 3x3 (``upsamplers.0.conv``)."""

    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = layers.Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, out_hw: tuple[int, int] | None = None) -> jax.Array:
        return self.conv(layers.upsample_nearest(x, out_hw))
