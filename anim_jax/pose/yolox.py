"""YOLOX (Megvii) in Flax NNX, channels-last: the person detector of DWPose (``yolox_l.onnx``).

CSPDarknet backbone (Focus stem, four CSP stages, SPP in the last), PAFPN neck and the decoupled
head, with every BatchNorm folded into its convolution (inference only). ``YOLOX(images)`` returns
what the exported ONNX graph returns, before DWPose's host-side ``demo_postprocess``:
``(B, A, 5 + num_classes)`` per anchor = raw box offsets ``(dx, dy, log w, log h)`` in grid units,
then sigmoid(objectness), then sigmoid(class scores); anchors run over the stride-8, 16 and 32 grids
in row-major order (A = 8400 at 640 x 640).

Input: ``(B, H, W, 3)`` float32 pixel values 0..255 exactly as DWPose feeds its session (the
letterboxed 640 x 640 image, pad value 114, no mean/std; channels in the order the caller's image
has), H and W multiples of 32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.layers import Dtype
from anim_jax.pose.layers import ConvAct, KeySequence, SPPBottleneck, conv_block


@dataclasses.dataclass(frozen=True)
class YOLOXConfig:
    """Sizes of a YOLOX network; all of them can be read off the weights' shapes.

    ``depths``: bottlenecks in the CSP layers of dark2..dark5; ``fpn_depth``: in each of the four
    PAFPN CSP layers. The neck's three levels have ``4, 8, 16 x base_channels`` channels, as in
    every official size (YOLOX's ``in_channels = [256, 512, 1024] x width`` with ``64 x width``
    base channels).
    """

    base_channels: int = 64
    depths: tuple[int, int, int, int] = (3, 9, 9, 3)
    fpn_depth: int = 3
    head_channels: int = 256
    num_classes: int = 80
    depthwise: bool = False
    spp_kernels: tuple[int, ...] = (5, 9, 13)

    @classmethod
    def yolox_l(cls) -> "YOLOXConfig":
        """DWPose's ``yolox_l.onnx`` (depth 1.0, width 1.0, 80 COCO classes)."""
        return cls()

    @classmethod
    def tiny(cls) -> "YOLOXConfig":
        """A few-channel network with the full structure, for tests."""
        return cls(base_channels=4, depths=(1, 1, 1, 1), fpn_depth=1, head_channels=8, num_classes=3)

    @property
    def fpn_channels(self) -> tuple[int, int, int]:
        return (4 * self.base_channels, 8 * self.base_channels, 16 * self.base_channels)

    @property
    def strides(self) -> tuple[int, int, int]:
        return (8, 16, 32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "YOLOXConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"YOLOX config: unknown fields {unknown}")
        d = dict(d)
        for k in ("depths", "spp_kernels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class Bottleneck(nnx.Module):
    def __init__(self, channels: int, *, shortcut: bool, depthwise: bool, **kw):
        self.conv1 = ConvAct(channels, channels, 1, **kw)
        self.conv2 = conv_block(channels, channels, 3, depthwise=depthwise, **kw)
        self.shortcut = shortcut

    def __call__(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.shortcut else y


class CSPLayer(nnx.Module):
    """YOLOX's CSPLayer: two 1x1 branches, bottlenecks on the first, concatenated, 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, n: int, *, shortcut: bool = True, depthwise: bool, **kw):
        hidden = out_channels // 2
        self.conv1 = ConvAct(in_channels, hidden, 1, **kw)
        self.conv2 = ConvAct(in_channels, hidden, 1, **kw)
        self.m = nnx.List([Bottleneck(hidden, shortcut=shortcut, depthwise=depthwise, **kw) for _ in range(n)])
        self.conv3 = ConvAct(2 * hidden, out_channels, 1, **kw)

    def __call__(self, x):
        x1, x2 = self.conv1(x), self.conv2(x)
        for block in self.m:
            x1 = block(x1)
        return self.conv3(jnp.concatenate([x1, x2], axis=-1))


class DarkStage(nnx.Module):
    """A stride-2 conv, an SPP block in the last stage, then a CSP layer."""

    def __init__(self, in_channels: int, out_channels: int, n: int, *, spp_kernels=None, depthwise: bool, **kw):
        self.down = conv_block(in_channels, out_channels, 3, stride=2, depthwise=depthwise, **kw)
        self.spp = SPPBottleneck(out_channels, out_channels, spp_kernels, **kw) if spp_kernels else None
        self.csp = CSPLayer(out_channels, out_channels, n, shortcut=spp_kernels is None, depthwise=depthwise, **kw)

    def __call__(self, x):
        x = self.down(x)
        if self.spp is not None:
            x = self.spp(x)
        return self.csp(x)


def focus(x: jax.Array) -> jax.Array:
    """Space-to-depth as YOLOX's Focus: (B, H, W, C) -> (B, H/2, W/2, 4C), blocks ordered
    top-left, bottom-left, top-right, bottom-right (the order the stem conv's weights expect)."""
    return jnp.concatenate([x[:, ::2, ::2], x[:, 1::2, ::2], x[:, ::2, 1::2], x[:, 1::2, 1::2]], axis=-1)


class CSPDarknet(nnx.Module):
    def __init__(self, cfg: YOLOXConfig, **kw):
        c, d, dw = cfg.base_channels, cfg.depths, cfg.depthwise
        self.stem = ConvAct(12, c, 3, **kw)
        self.dark2 = DarkStage(c, 2 * c, d[0], depthwise=dw, **kw)
        self.dark3 = DarkStage(2 * c, 4 * c, d[1], depthwise=dw, **kw)
        self.dark4 = DarkStage(4 * c, 8 * c, d[2], depthwise=dw, **kw)
        self.dark5 = DarkStage(8 * c, 16 * c, d[3], spp_kernels=cfg.spp_kernels, depthwise=dw, **kw)

    def __call__(self, x):
        x = self.dark2(self.stem(focus(x)))
        c3 = self.dark3(x)
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


def _upsample2(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class PAFPN(nnx.Module):
    def __init__(self, cfg: YOLOXConfig, **kw):
        c0, c1, c2 = cfg.fpn_channels
        n, dw = cfg.fpn_depth, cfg.depthwise
        self.lateral_conv0 = ConvAct(c2, c1, 1, **kw)
        self.c3_p4 = CSPLayer(2 * c1, c1, n, shortcut=False, depthwise=dw, **kw)
        self.reduce_conv1 = ConvAct(c1, c0, 1, **kw)
        self.c3_p3 = CSPLayer(2 * c0, c0, n, shortcut=False, depthwise=dw, **kw)
        self.bu_conv2 = conv_block(c0, c0, 3, stride=2, depthwise=dw, **kw)
        self.c3_n3 = CSPLayer(2 * c0, c1, n, shortcut=False, depthwise=dw, **kw)
        self.bu_conv1 = conv_block(c1, c1, 3, stride=2, depthwise=dw, **kw)
        self.c3_n4 = CSPLayer(2 * c1, c2, n, shortcut=False, depthwise=dw, **kw)

    def __call__(self, features):
        x2, x1, x0 = features
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.c3_p4(jnp.concatenate([_upsample2(fpn_out0), x1], axis=-1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.c3_p3(jnp.concatenate([_upsample2(fpn_out1), x2], axis=-1))
        pan_out1 = self.c3_n3(jnp.concatenate([self.bu_conv2(pan_out2), fpn_out1], axis=-1))
        pan_out0 = self.c3_n4(jnp.concatenate([self.bu_conv1(pan_out1), fpn_out0], axis=-1))
        return pan_out2, pan_out1, pan_out0


class HeadLevel(nnx.Module):
    """The decoupled head at one stride: a 1x1 stem, two 3x3 convs per branch, three 1x1 predictions."""

    def __init__(self, in_channels: int, cfg: YOLOXConfig, **kw):
        h, dw = cfg.head_channels, cfg.depthwise
        self.stem = ConvAct(in_channels, h, 1, **kw)
        self.cls_convs = nnx.List([conv_block(h, h, 3, depthwise=dw, **kw) for _ in range(2)])
        self.cls_pred = ConvAct(h, cfg.num_classes, 1, act=False, **kw)
        self.reg_convs = nnx.List([conv_block(h, h, 3, depthwise=dw, **kw) for _ in range(2)])
        self.reg_pred = ConvAct(h, 4, 1, act=False, **kw)
        self.obj_pred = ConvAct(h, 1, 1, act=False, **kw)

    def __call__(self, x):
        x = self.stem(x)
        cls, reg = x, x
        for conv in self.cls_convs:
            cls = conv(cls)
        for conv in self.reg_convs:
            reg = conv(reg)
        out = jnp.concatenate(
            [self.reg_pred(reg), jax.nn.sigmoid(self.obj_pred(reg)), jax.nn.sigmoid(self.cls_pred(cls))], axis=-1
        )
        b, hh, ww, c = out.shape
        return out.reshape(b, hh * ww, c)


class YOLOXHead(nnx.Module):
    def __init__(self, cfg: YOLOXConfig, **kw):
        self.levels = nnx.List([HeadLevel(c, cfg, **kw) for c in cfg.fpn_channels])

    def __call__(self, features):
        return jnp.concatenate([level(x) for level, x in zip(self.levels, features)], axis=1)


class YOLOX(nnx.Module):
    """``(B, H, W, 3)`` pixels -> ``(B, A, 5 + num_classes)`` as ``yolox_l.onnx`` outputs (see the module doc)."""

    def __init__(self, config: YOLOXConfig, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=KeySequence(rngs))
        self.backbone = CSPDarknet(config, **kw)
        self.neck = PAFPN(config, **kw)
        self.head = YOLOXHead(config, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 32 or images.shape[2] % 32:
            raise ValueError(f"YOLOX expects (B, H, W, 3) images with H, W multiples of 32, got {images.shape}")
        return self.head(self.neck(self.backbone(images))).astype(jnp.float32)
