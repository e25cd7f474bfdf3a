"""Channels-last building blocks shared by every model.

Why our own thin layers instead of ``nnx.Linear``/``nnx.Conv``:
  * every parameter carries logical axis names (``out_sharding`` metadata) that the rules table in
    the config maps onto a mesh (see ``anim_jax.parallel``), without needing a mesh at construction;
  * norms compute their statistics in float32 whatever the compute dtype (PyTorch autocast does
    the same), and GroupNorm's reduction axes are explicit so the caller decides between per-frame
    ("inflated") and frame-pooled statistics;
  * padding and upsampling follow PyTorch exactly, which parity with the checkpoints needs.

Parameter leaf names are ``kernel`` (linear ``(in, out)``, conv ``(kh, kw, in, out)``), ``bias`` and
``scale``; ``anim_jax.convert.mapping`` turns them into PyTorch ``weight``/``bias`` with transposes.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype | type


def param(rngs_key, init, shape, dtype, axes: Sequence[str | None]) -> nnx.Param:
    """A parameter annotated with logical axis names, placed later by ``anim_jax.parallel``."""
    return nnx.Param(init(rngs_key, shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def _torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), +).

    Eagerly the values are drawn with numpy, seeded from the jax key: ``jax.random`` would compile
    a kernel per distinct parameter shape, which made building a UNet take minutes on CPU. Under
    tracing (``nnx.eval_shape``, jit) the jax path is used and nothing is compiled anyway.
    """
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype):
        if isinstance(key, jax.core.Tracer):
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        values = np.random.default_rng(seed).uniform(-bound, bound, shape)
        return jnp.asarray(values, dtype)

    return init


class Linear(nnx.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        axes: tuple[str | None, str | None] = ("embed", "mlp"),
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = _torch_uniform(in_features)
        self.kernel = param(rngs.params(), init, (in_features, out_features), param_dtype, axes)
        self.bias = param(rngs.params(), init, (out_features,), param_dtype, axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


# Inputs at most this many pixels high and wide are convolved as one matmul: XLA rewrites a 3x3
# convolution over a 2x2 input (the UNet's lowest level at 64x64) into a form with the kernel as the
# input, which ran 17x slower on the CPU (3.4 ms against 0.2 ms for 48 x 2x2 x 64 channels; at 4x4
# the convolution is faster again: benchmarks/RESULTS.md, "Issue 19, CPU round 8").
_MATMUL_CONV_MAX_SIDE = 2


@functools.cache
def _tap_table(h: int, w: int, k: int, stride: int, padding: int) -> tuple[np.ndarray, int, int]:
    """``(table, ho, wo)``: ``table[i, o]`` is the kernel tap (``dy * k + dx``) joining input pixel i
    to output pixel o of a k x k convolution over an h x w input (row-major), ``k * k`` where none does."""
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    table = np.full((h, w, ho, wo), k * k, np.int32)
    for oy in range(ho):
        for ox in range(wo):
            for dy in range(k):
                for dx in range(k):
                    iy, ix = oy * stride + dy - padding, ox * stride + dx - padding
                    if 0 <= iy < h and 0 <= ix < w:
                        table[iy, ix, oy, ox] = dy * k + dx
    return table.reshape(h * w, ho * wo), ho, wo


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """``conv_general_dilated`` (NHWC, HWIO, symmetric padding) over a small image as one matmul:
    the kernel unfolded into the dense (h*w*C_in, ho*wo*C_out) map it applies. Over 2x2 that is
    fewer multiplies than the 3x3 patches (16 against 36 per channel pair; over 1x1, 1 against 9),
    and it compiles to one gather of the kernel instead of a padded slice and a concatenation per
    tap, each a kernel for XLA:CPU to compile: the 64x64 DDIM program has 40 fewer fusion kernels and
    54 fewer elemental ones, and its compile peaks ~25 MiB lower (benchmarks/RESULTS.md, "Issue 19,
    CPU round 17"). A 1x1 kernel without padding needs no unfolding."""
    n, h, w, c = x.shape
    k, cout = kernel.shape[0], kernel.shape[-1]
    if k == 1 and padding == 0:
        return x[:, ::stride, ::stride] @ kernel.reshape(c, cout)
    table, ho, wo = _tap_table(h, w, k, stride, padding)
    taps = kernel.reshape(k * k, c, cout)
    dense = taps[np.minimum(table, k * k - 1)]  # (h*w, ho*wo, C_in, C_out)
    if (table == k * k).any():
        dense = jnp.where((table < k * k)[:, :, None, None], dense, 0)
    dense = dense.transpose(0, 2, 1, 3).reshape(h * w * c, ho * wo * cout)
    return (x.reshape(n, h * w * c) @ dense).reshape(n, ho, wo, cout)


class Conv2d(nnx.Module):
    """PyTorch ``nn.Conv2d`` semantics (symmetric integer padding) on channels-last input.

    Any leading axes beyond (N, H, W, C) are folded into the batch, so a video (B, F, H, W, C)
    is convolved frame by frame exactly like the original's ``InflatedConv3d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        use_bias: bool = True,
        axes: tuple[str | None, ...] = (None, None, "conv_in", "conv_out"),
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = _torch_uniform(in_channels * kernel_size * kernel_size)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = param(rngs.params(), init, shape, param_dtype, axes)
        self.bias = param(rngs.params(), init, (out_channels,), param_dtype, axes[-1:]) if use_bias else None
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:])
        dtype = self.dtype or x.dtype
        p = self.padding
        if x.shape[1] <= _MATMUL_CONV_MAX_SIDE and x.shape[2] <= _MATMUL_CONV_MAX_SIDE:
            y = _conv_as_matmul(x.astype(dtype), self.kernel[...].astype(dtype), self.stride, p)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(dtype),
                self.kernel[...].astype(dtype),
                window_strides=(self.stride, self.stride),
                padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y.reshape(lead + y.shape[1:])


class GroupNorm(nnx.Module):
    """``nn.GroupNorm`` on channels-last input; statistics in float32.

    Statistics are taken over every axis except the first (the batch) and the channel groups,
    so the caller picks the reduction by reshaping: (B*F, H, W, C) gives per-frame statistics,
    (B, F*H*W, C) pools them over frames (the original's non-inflated 5-D GroupNorm).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        if affine:
            self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype), out_sharding=("norm",), eager_sharding=False)
            self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        else:
            self.scale = self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        n, c, g = x.shape[0], x.shape[-1], self.num_groups
        k = c // g
        # Sums over the (n, positions, channels) view keep the channel axis minor, which XLA:CPU
        # reduces 1.7-6x faster than a reduction over (H, W, channels-in-group) of the 5-D grouped
        # view (benchmarks/RESULTS.md, "Issue 19, CPU round 4"); per-channel sums are then added
        # up per group. The variance is two-pass (exact when |mean| >> std).
        xf = x.astype(jnp.float32).reshape(n, -1, c)
        count = xf.shape[1] * k
        mean = jnp.repeat(xf.sum(axis=1).reshape(n, g, k).sum(axis=-1) / count, k, axis=1)  # (n, c)
        var = jnp.square(xf - mean[:, None, :]).sum(axis=1).reshape(n, g, k).sum(axis=-1) / count
        # The output is x * a + b with per-(sample, channel) a and b (torch's CPU kernel does the
        # same): the elementwise pass then reads x once and shares no ``x - mean`` with the variance,
        # so XLA does not materialise that float32 copy of the activation.
        a = jnp.repeat(jax.lax.rsqrt(var + self.eps), k, axis=1)  # (n, c)
        b = -mean * a
        if self.scale is not None:
            scale = self.scale[...].astype(jnp.float32)
            a, b = a * scale, b * scale + self.bias[...].astype(jnp.float32)
        stat_shape = (n,) + (1,) * (x.ndim - 2) + (c,)
        a, b = a.reshape(stat_shape), b.reshape(stat_shape)
        return (x.astype(jnp.float32) * a + b).astype(dtype)


class LayerNorm(nnx.Module):
    """``nn.LayerNorm`` over the last axis; statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch ``interpolate(mode="nearest")``: ``floor(dst * in / out)``.

    ``jax.image.resize(..., "nearest")`` uses half-pixel centres instead, which differs for
    non-integer ratios (e.g. 13 -> 25 at 12 of 25 positions), so odd latent sizes need this.
    """
    scale = in_size / out_size
    return np.minimum(np.floor(np.arange(out_size) * scale).astype(np.int64), in_size - 1)


def upsample_nearest(x: jax.Array, out_hw: tuple[int, int] | None = None) -> jax.Array:
    """Nearest upsampling of (..., H, W, C) to ``out_hw`` (default 2x), PyTorch indexing."""
    h, w = x.shape[-3], x.shape[-2]
    oh, ow = out_hw if out_hw is not None else (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    x = jnp.take(x, jnp.asarray(torch_nearest_indices(h, oh)), axis=-3)
    return jnp.take(x, jnp.asarray(torch_nearest_indices(w, ow)), axis=-2)


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, downscale_freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """diffusers ``get_timestep_embedding``: sinusoidal features of (B,) timesteps -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
