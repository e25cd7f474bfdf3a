"""Channels-last blocks shared by the DWPose networks (YOLOX and RTMPose).

Both originals are stacks of Conv -> BatchNorm -> SiLU. The networks here only run inference, so
each BatchNorm is folded into its convolution once, at conversion (``anim_jax.convert.dwpose``):
a :class:`ConvAct` holds the folded kernel and bias. ``anim_jax.models.layers.Conv2d`` has no
grouped convolutions, which the depthwise layers need, hence this small conv of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.layers import Dtype, _torch_uniform, param

# The pose networks are replicated on every device (frames are sharded, never weights).
_CONV_AXES = (None, None, None, None)


class ConvAct(nnx.Module):
    """``Conv2d(k, stride, padding=k//2, groups)`` with bias (BatchNorm folded in), then SiLU if ``act``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"ConvAct: {in_channels}->{out_channels} channels are not divisible into {groups} groups")
        init = _torch_uniform(in_channels // groups * kernel_size * kernel_size)
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        self.kernel = param(rngs.params(), init, shape, param_dtype, _CONV_AXES)
        self.bias = param(rngs.params(), init, (out_channels,), param_dtype, (None,))
        self.stride, self.groups, self.act, self.dtype = stride, groups, act, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        k = self.kernel.shape[0]
        p = k // 2
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        y = y + self.bias[...].astype(dtype)
        return jax.nn.silu(y) if self.act else y


class DepthwiseSeparable(nnx.Module):
    """A depthwise ``k x k`` ConvAct followed by a pointwise ``1 x 1`` ConvAct (YOLOX ``DWConv``,
    mmcv ``DepthwiseSeparableConvModule``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, **kw):
        self.dconv = ConvAct(in_channels, in_channels, kernel_size, stride=stride, groups=in_channels, **kw)
        self.pconv = ConvAct(in_channels, out_channels, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pconv(self.dconv(x))


def conv_block(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, depthwise: bool = False, **kw):
    """A ConvAct, or its depthwise-separable form where the architecture is a depthwise variant."""
    if depthwise:
        return DepthwiseSeparable(in_channels, out_channels, kernel_size, stride=stride, **kw)
    return ConvAct(in_channels, out_channels, kernel_size, stride=stride, **kw)


def max_pool_same(x: jax.Array, kernel_size: int) -> jax.Array:
    """``nn.MaxPool2d(k, stride=1, padding=k//2)`` on (B, H, W, C): the padding never wins a max."""
    p = kernel_size // 2
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1), (1, 1, 1, 1), ((0, 0), (p, p), (p, p), (0, 0))
    )


class SPPBottleneck(nnx.Module):
    """1x1 conv to half the channels, concatenation with max pools of each kernel size, 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes=(5, 9, 13), **kw):
        hidden = in_channels // 2
        self.kernel_sizes = tuple(kernel_sizes)
        self.conv1 = ConvAct(in_channels, hidden, 1, **kw)
        self.conv2 = ConvAct(hidden * (len(self.kernel_sizes) + 1), out_channels, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv1(x)
        x = jnp.concatenate([x] + [max_pool_same(x, k) for k in self.kernel_sizes], axis=-1)
        return self.conv2(x)
