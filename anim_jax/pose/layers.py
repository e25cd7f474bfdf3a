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
from anim_jax.pose import winograd

class KeySequence:
    """Stands in for ``nnx.Rngs`` inside the pose networks: ``params()`` returns ``fold_in(key, n)``
    for n = 0, 1, ...

    Each draw from an ``nnx.Rngs`` stream updates a Variable, which under ``nnx.eval_shape`` costs
    about 20 ms (jax builds a provenance message per update); with ~300 parameters that made
    loading a converted pair take seconds. One draw from the caller's Rngs seeds this sequence.
    """

    def __init__(self, rngs: nnx.Rngs):
        self._key, self._n = rngs.params(), 0

    def params(self) -> jax.Array:
        self._n += 1
        return jax.random.fold_in(self._key, self._n)


# The pose networks are replicated on every device (frames are sharded, never weights).
_CONV_AXES = (None, None, None, None)


class WinogradKernel(nnx.Variable):
    """A ConvAct's 3x3 kernel in Winograd's transform domain (``anim_jax.pose.winograd``), put there
    by :func:`use_winograd` from the converted kernel; derived at run time, never saved."""


# Below this many input or output channels the Winograd transforms' memory traffic outweighs the
# matmuls it saves: measured here (benchmarks/pose_conv.py), YOLOX's 12-channel stem conv ran at
# 0.35-0.39x, its 64-channel layers between 0.65x and 1.47x from run to run, and its layers of
# 128 channels or more 1.1-2.4x faster than XLA's direct convolution.
WINOGRAD_MIN_CHANNELS = 128


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
        x, kernel = x.astype(dtype), self.kernel[...].astype(dtype)
        if isinstance(self.kernel, WinogradKernel):
            y = winograd.conv3x3(x, kernel)
        elif self.groups > 1 and self.groups == x.shape[-1] == kernel.shape[-1]:
            y = depthwise_conv(x, kernel, self.stride)
        elif kernel.shape[:2] == (1, 1) and self.stride == 1 and self.groups == 1:
            # A pointwise conv is a matmul over channels. XLA:CPU's matmul path ran DWPose's 1x1
            # layers 1.3x to 5x faster than its convolution path, with bit-identical results.
            y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
        else:
            p = kernel.shape[0] // 2
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
            )
        y = y + self.bias[...].astype(dtype)
        return jax.nn.silu(y) if self.act else y

    def winograd_eligible(self, min_channels: int = WINOGRAD_MIN_CHANNELS) -> bool:
        """A float32 3x3 stride-1 dense conv with at least ``min_channels`` in and out."""
        if isinstance(self.kernel, WinogradKernel):
            return False  # already is one
        kh, kw, cin, cout = self.kernel.shape
        return (
            (kh, kw, self.stride, self.groups) == (3, 3, 1, 1)
            and min(cin, cout) >= min_channels
            and self.kernel.dtype == jnp.float32
            and self.dtype in (None, jnp.float32)
        )


def use_winograd(model: nnx.Module, *, min_channels: int = WINOGRAD_MIN_CHANNELS) -> nnx.Module:
    """A copy of ``model`` whose eligible :class:`ConvAct` layers (:meth:`ConvAct.winograd_eligible`)
    run as Winograd F(4x4, 3x3) convolutions, their kernels transformed once here.

    For inference on CPU (``anim_jax.pose.compile_options.prepare``); ``model`` itself is unchanged
    and the copy shares its other arrays. Outputs differ from the direct convolution's by a few
    float32 roundings (``anim_jax.pose.winograd``).
    """
    model = nnx.merge(*nnx.split(model))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, ConvAct) and module.winograd_eligible(min_channels):
            module.kernel = WinogradKernel(winograd.transform_kernel(module.kernel[...]))
    return model


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A depthwise ``k x k`` convolution (padding k//2) as a sum of k*k shifted, channel-scaled
    copies of the input, which XLA fuses into one loop.

    Hand-written because XLA:CPU runs ``feature_group_count == channels`` convolutions through a
    generic grouped path: measured here (RTMPose's 5x5 at 64 channels, 96 x 72) 48 ms against
    1.0 ms for this form, with results equal to float32 rounding.
    """
    k = kernel.shape[0]
    p = k // 2
    b, h, w, c = x.shape
    oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    y = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, c),
                                (1, stride, stride, 1)) * kernel[i, j, 0]
            y = tap if y is None else y + tap
    return y


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


def _max_shifted(x: jax.Array, kernel_size: int, axis: int) -> jax.Array:
    """Running max over ``kernel_size`` neighbours along ``axis`` (stride 1, -inf padding), as the
    max of shifted slices, which XLA fuses into one loop."""
    p = kernel_size // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (p, p)
    xp = jnp.pad(x, pad, constant_values=-jnp.inf)
    n = x.shape[axis]
    out = None
    for i in range(kernel_size):
        tap = jax.lax.slice_in_dim(xp, i, i + n, axis=axis)
        out = tap if out is None else jnp.maximum(out, tap)
    return out


def max_pool_same(x: jax.Array, kernel_size: int) -> jax.Array:
    """``nn.MaxPool2d(k, stride=1, padding=k//2)`` on (B, H, W, C), odd k: the padding never wins a max.

    Separable (a max over a k x k window is a max over rows of maxes over columns), so 2k
    comparisons per output instead of k*k. XLA:CPU's ``reduce_window`` took 84 ms of YOLOX-L's
    1.29 s on one core for SPP's three pools at 20x20x512; this form takes a few.
    """
    return _max_shifted(_max_shifted(x, kernel_size, 1), kernel_size, 2)


def spp_pools(x: jax.Array, kernel_sizes) -> list[jax.Array]:
    """``[max_pool_same(x, k) for k in kernel_sizes]``, each pool from the previous one where the
    sizes allow: a stride-1 max pool of size a applied to one of size b is one of size a + b - 1
    (as YOLOv5's SPPF uses), so SPP's 5, 9, 13 cost three 5-pools."""
    pools, prev, prev_k = [], x, 1
    for k in kernel_sizes:
        if k % 2 == 0:
            raise ValueError(f"SPP: max pool sizes must be odd, got {k}")
        step = k - prev_k + 1
        if step < 1:  # not increasing: pool from the input
            prev, step = x, k
        prev = max_pool_same(prev, step)
        pools.append(prev)
        prev_k = k
    return pools


class SPPBottleneck(nnx.Module):
    """1x1 conv to half the channels, concatenation with max pools of each kernel size, 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes=(5, 9, 13), **kw):
        hidden = in_channels // 2
        self.kernel_sizes = tuple(kernel_sizes)
        self.conv1 = ConvAct(in_channels, hidden, 1, **kw)
        self.conv2 = ConvAct(hidden * (len(self.kernel_sizes) + 1), out_channels, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv1(x)
        x = jnp.concatenate([x, *spp_pools(x, self.kernel_sizes)], axis=-1)
        return self.conv2(x)
