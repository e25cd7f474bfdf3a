"""Inception-v1 I3D (Carreira & Zisserman 2017), the video network behind FVD, in Flax NNX.

Mirrors the PyTorch port most checkpoints use (``InceptionI3d`` with ``Unit3D`` blocks: Conv3d
without bias, BatchNorm3d, ReLU), so parameter paths match its state-dict keys one to one:
``Conv3d_1a_7x7.conv3d.kernel`` is ``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b1b.bn.scale`` is
``Mixed_3b.b1b.bn.weight``, ``logits.conv3d.bias`` is ``logits.conv3d.bias``.

Input: channels-last videos (B, T, H, W, 3) in [-1, 1]. Every convolution and max pool uses
TensorFlow "SAME" padding computed from the input size (zeros, the extra pixel at the end), as the
original does; frames of 193-224 pixels end as 7x7 maps, which the final (frames, 7, 7) average
pool turns into one vector per time step. Output: the logits averaged over time (B, classes) and,
on request, the pooled 1024-d features averaged over time.

The network is only ever evaluated, so BatchNorm runs in inference mode and its running
statistics are stored as ``nnx.Param`` like the affine parameters: that keeps them in the
converted file and under the same strict name/shape check.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.layers import _torch_uniform, param

# Inception modules in order, with (b0, b1a, b1b, b2a, b2b, b3b) output channels.
MIXED_NAMES = (
    "Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b", "Mixed_5c",
)
_MIXED_CHANNELS = (
    (64, 96, 128, 16, 32, 32),
    (128, 128, 192, 32, 96, 64),
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
    (256, 160, 320, 32, 128, 128),
    (384, 192, 384, 48, 128, 128),
)
STEM_NAMES = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
BRANCH_NAMES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")


@dataclasses.dataclass(frozen=True)
class I3DConfig:
    """Shape of the network. The defaults are the released Kinetics-400 I3D.

    ``bn_eps``: 1e-3 in piergiaj/pytorch-i3d (and TF's original); TATS's converted FVD weights
    declare 1e-5. ``logits_pool_frames``: the final average pool spans 2 time steps in the
    original; DisCo's FVD copy pools 1 (identical for 16-frame clips, which end with 2 steps).
    """

    num_classes: int = 400
    in_channels: int = 3
    stem_channels: tuple[int, int, int] = (64, 64, 192)
    mixed_channels: tuple[tuple[int, ...], ...] = _MIXED_CHANNELS
    bn_eps: float = 1e-3
    logits_pool_frames: int = 2

    def __post_init__(self):
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
        object.__setattr__(self, "mixed_channels", tuple(tuple(int(c) for c in m) for m in self.mixed_channels))
        if len(self.stem_channels) != 3:
            raise ValueError(f"I3DConfig.stem_channels: expected 3 widths, got {self.stem_channels}")
        if len(self.mixed_channels) != len(MIXED_NAMES) or any(len(m) != 6 for m in self.mixed_channels):
            raise ValueError(f"I3DConfig.mixed_channels: expected {len(MIXED_NAMES)} tuples of 6 widths")
        if self.logits_pool_frames < 1:
            raise ValueError(f"I3DConfig.logits_pool_frames must be >= 1, got {self.logits_pool_frames}")

    @property
    def features(self) -> int:
        """Width of the pooled features (1024 for the real network)."""
        m = self.mixed_channels[-1]
        return m[0] + m[2] + m[4] + m[5]

    def narrow(self, divisor: int) -> "I3DConfig":
        """Every width divided by ``divisor`` (rounded up): a cheap network of the same structure, for tests."""
        div = lambda c: max(1, -(-c // divisor))  # noqa: E731
        return dataclasses.replace(
            self,
            stem_channels=tuple(div(c) for c in self.stem_channels),
            mixed_channels=tuple(tuple(div(c) for c in m) for m in self.mixed_channels),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "stem_channels": list(self.stem_channels),
            "mixed_channels": [list(m) for m in self.mixed_channels],
            "bn_eps": self.bn_eps,
            "logits_pool_frames": self.logits_pool_frames,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "I3DConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"I3D config: unknown fields {unknown}")
        return cls(**d)

    def min_frames(self) -> int:
        """Shortest clip the network accepts: three stride-2 stages must leave ``logits_pool_frames`` steps."""
        return 8 * (self.logits_pool_frames - 1) + 1


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: the total keeps ceil(size / stride) outputs; the odd pixel goes last."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _same_pads(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int]]:
    return [same_padding(s, k, st) for s, k, st in zip(shape, kernel, stride)]


class Conv3d(nnx.Module):
    """Channels-last 3-D convolution with TF "SAME" padding; kernel (kt, kh, kw, in, out).

    ``fold_time`` computes the same convolution as one 2-D convolution over the temporal taps
    stacked along channels. XLA's CPU backend runs the stem's strided 7x7x7 convolution of 3
    channels about 10x slower than this 2-D form; the stacked input (kt / stride_t copies of the
    raw video) is small, so the stem uses it on every backend.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], *, stride: Sequence[int] = (1, 1, 1),
                 use_bias: bool = False, fold_time: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel_shape = tuple(kernel)
        self.stride = tuple(stride)
        self.fold_time = fold_time
        init = _torch_uniform(in_channels * math.prod(self.kernel_shape))
        shape = (*self.kernel_shape, in_channels, out_channels)
        self.kernel = param(rngs.params(), init, shape, param_dtype, (None,) * 5)
        self.bias = param(rngs.params(), init, (out_channels,), param_dtype, (None,)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernel = self.kernel[...].astype(dtype)
        pads = _same_pads(x.shape[1:4], self.kernel_shape, self.stride)
        if self.fold_time:
            y = self._folded(x, kernel, pads)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=self.stride, padding=pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y

    def _folded(self, x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
        kt, kh, kw, cin, cout = kernel.shape
        st = self.stride[0]
        x = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
        t_out = (x.shape[1] - kt) // st + 1
        span = st * (t_out - 1) + 1
        x = jnp.concatenate([x[:, i:i + span:st] for i in range(kt)], axis=-1)  # channels ordered (tap, c)
        b = x.shape[0]
        y = jax.lax.conv_general_dilated(
            x.reshape((b * t_out,) + x.shape[2:]),
            jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * cin, cout),
            window_strides=self.stride[1:],
            padding=pads[1:],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y.reshape((b, t_out) + y.shape[1:])


class BatchNorm(nnx.Module):
    """Inference-mode BatchNorm3d over the channel axis, in float32."""

    def __init__(self, channels: int, *, eps: float, rngs: nnx.Rngs):
        del rngs  # deterministic init: the identity transform
        axes = (None,)
        self.scale = param(None, lambda k, s, d: jnp.ones(s, d), (channels,), jnp.float32, axes)
        self.bias = param(None, lambda k, s, d: jnp.zeros(s, d), (channels,), jnp.float32, axes)
        self.running_mean = param(None, lambda k, s, d: jnp.zeros(s, d), (channels,), jnp.float32, axes)
        self.running_var = param(None, lambda k, s, d: jnp.ones(s, d), (channels,), jnp.float32, axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.running_var[...] + self.eps) * self.scale[...]
        y = (x.astype(jnp.float32) - self.running_mean[...]) * inv + self.bias[...]
        return y.astype(x.dtype)


class Unit3D(nnx.Module):
    """Conv3d (SAME) -> BatchNorm -> ReLU, or a plain biased conv for the logits."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = (1, 1, 1), *,
                 stride: Sequence[int] = (1, 1, 1), eps: float = 1e-3, head: bool = False, fold_time: bool = False,
                 dtype=None, rngs: nnx.Rngs):
        self.conv3d = Conv3d(in_channels, out_channels, kernel, stride=stride, use_bias=head, fold_time=fold_time,
                             dtype=dtype, rngs=rngs)
        self.bn = None if head else BatchNorm(out_channels, eps=eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv3d(x)
        if self.bn is None:
            return x
        return jax.nn.relu(self.bn(x))


def max_pool_same(x: jax.Array, kernel: Sequence[int], stride: Sequence[int]) -> jax.Array:
    """Max pool with TF "SAME" padding. The pad value is zero as in the original; every input here
    follows a ReLU, so this equals padding with -inf."""
    pads = [(0, 0), *_same_pads(x.shape[1:4], kernel, stride), (0, 0)]
    x = jnp.pad(x, pads)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *kernel, 1), (1, *stride, 1), "VALID")


class InceptionModule(nnx.Module):
    """Four branches (1x1 / 1x1->3x3 / 1x1->3x3 / pool->1x1) concatenated along channels."""

    def __init__(self, in_channels: int, widths: Sequence[int], *, eps: float, dtype=None, rngs: nnx.Rngs):
        w0, w1a, w1b, w2a, w2b, w3b = widths
        kw = dict(eps=eps, dtype=dtype, rngs=rngs)
        self.b0 = Unit3D(in_channels, w0, **kw)
        self.b1a = Unit3D(in_channels, w1a, **kw)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3), **kw)
        self.b2a = Unit3D(in_channels, w2a, **kw)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3), **kw)
        self.b3b = Unit3D(in_channels, w3b, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], axis=-1)


# Max pools between stages: (after which layer, kernel, stride).
_POOLS = {
    "Conv3d_1a_7x7": ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_2a_3x3
    "Conv3d_2c_3x3": ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_3a_3x3
    "Mixed_3c": ((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3
    "Mixed_4f": ((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2
}
_POOL_HW = 7  # spatial extent of the final average pool


class I3D(nnx.Module):
    """Inception-v1 I3D. ``model(video)`` -> (B, classes) logits averaged over time."""

    def __init__(self, config: I3DConfig = I3DConfig(), *, dtype=None, rngs: nnx.Rngs):
        self.config = config
        eps = config.bn_eps
        c1, c2, c3 = config.stem_channels
        kw = dict(eps=eps, dtype=dtype, rngs=rngs)
        self.Conv3d_1a_7x7 = Unit3D(config.in_channels, c1, (7, 7, 7), stride=(2, 2, 2), fold_time=True, **kw)
        self.Conv3d_2b_1x1 = Unit3D(c1, c2, **kw)
        self.Conv3d_2c_3x3 = Unit3D(c2, c3, (3, 3, 3), **kw)
        width = c3
        for name, widths in zip(MIXED_NAMES, config.mixed_channels):
            setattr(self, name, InceptionModule(width, widths, eps=eps, dtype=dtype, rngs=rngs))
            width = widths[0] + widths[2] + widths[4] + widths[5]
        self.logits = Unit3D(width, config.num_classes, head=True, dtype=dtype, rngs=rngs)

    def trunk(self, video: jax.Array) -> jax.Array:
        """Everything before the average pool: (B, T, H, W, C) -> (B, ~T/8, ~H/32, ~W/32, features)."""
        x = video
        for name in (*STEM_NAMES, *MIXED_NAMES):
            x = getattr(self, name)(x)
            if name in _POOLS:
                x = max_pool_same(x, *_POOLS[name])
        return x

    def __call__(self, video: jax.Array, *, return_pooled: bool = False):
        """Logits (B, classes) averaged over time; with ``return_pooled`` also the pooled (B, features)."""
        if video.ndim != 5 or video.shape[-1] != self.config.in_channels:
            raise ValueError(f"I3D: expected videos (B, T, H, W, {self.config.in_channels}), got {video.shape}")
        t, h, w = video.shape[1:4]
        if t < self.config.min_frames():
            raise ValueError(f"I3D: clips need at least {self.config.min_frames()} frames, got {t}")
        # Five stride-2 SAME stages: the maps before the average pool are ceil(size / 32) wide.
        if (-(-h // 32), -(-w // 32)) != (_POOL_HW, _POOL_HW):
            raise ValueError(
                f"I3D: frames of {h}x{w} leave {-(-h // 32)}x{-(-w // 32)} maps before the 7x7 average pool; "
                "the network expects 193-224 pixels (i3d_features resizes to 224x224)"
            )
        x = self.trunk(video)
        window = (1, self.config.logits_pool_frames, _POOL_HW, _POOL_HW, 1)
        pooled = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, window, (1,) * 5, "VALID")
        pooled = (pooled / math.prod(window)).astype(x.dtype)  # (B, T'', 1, 1, features)
        logits = self.logits(pooled)[:, :, 0, 0, :].astype(jnp.float32).mean(axis=1)
        if return_pooled:
            return logits, pooled[:, :, 0, 0, :].astype(jnp.float32).mean(axis=1)
        return logits
