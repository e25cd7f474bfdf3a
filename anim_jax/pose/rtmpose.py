"""RTMPose (OpenMMLab) in Flax NNX, channels-last: DWPose's whole-body pose network (``dw-ll_ucoco_384.onnx``).

CSPNeXt backbone (mmdet/mmpose ``CSPNeXt``, BatchNorm folded into each conv) and the RTMCC head:
a large-kernel conv to one map per keypoint, the flattened map through ScaleNorm + Linear, one
gated attention unit (GAU) over the keypoint tokens, and two linear SimCC classifiers.

``RTMPose(crops)``: ``(B, H, W, 3)`` float32 crops already normalised as DWPose does
(``(pixel - mean) / std``, mean ``(123.675, 116.28, 103.53)``, std ``(58.395, 57.12, 57.375)``)
-> ``(simcc_x (B, K, W * r), simcc_y (B, K, H * r))`` logits, ``r`` the SimCC split ratio
(DWPose: 384 x 288 crops, 133 keypoints, r = 2 -> (B, 133, 576) and (B, 133, 768)).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.layers import Dtype, Linear
from anim_jax.pose.layers import ConvAct, DepthwiseSeparable, KeySequence, SPPBottleneck

SCALE_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class RTMPoseConfig:
    """Sizes of an RTMPose network with a CSPNeXt backbone and an RTMCC head.

    Everything but the structural constants of CSPNeXt (identity shortcuts in every stage but the
    one with the SPP block; CSPNeXt block kernel 5) can be read off the weights' shapes.
    ``input_size`` is (H, W) of the crops.
    """

    stem_channels: tuple[int, ...] = (32, 32, 64)
    stage_channels: tuple[int, ...] = (128, 256, 512, 1024)
    stage_blocks: tuple[int, ...] = (3, 6, 6, 3)
    spp_stage: int = 3  # index of the stage with the SPP block (the last, in P5 and P6); -1: none
    expand_ratio: float = 0.5
    channel_attention: bool = True
    block_kernel: int = 5
    spp_kernels: tuple[int, ...] = (5, 9, 13)
    num_keypoints: int = 133
    final_kernel: int = 7
    hidden_dims: int = 256
    gau_s: int = 128
    gau_expansion: int = 2
    input_size: tuple[int, int] = (384, 288)
    simcc_split_ratio: float = 2.0

    @classmethod
    def dwpose_l_384(cls) -> "RTMPoseConfig":
        """DWPose's ``dw-ll_ucoco_384.onnx``: RTMPose-L, 133 COCO-WholeBody keypoints, 384 x 288."""
        return cls()

    @classmethod
    def tiny(cls) -> "RTMPoseConfig":
        """A few-channel network with the full structure, for tests (crops 96 x 64)."""
        return cls(stem_channels=(4, 4, 8), stage_channels=(8, 16, 16, 32), stage_blocks=(1, 1, 1, 1),
                   num_keypoints=5, final_kernel=3, hidden_dims=16, gau_s=8, input_size=(96, 64))

    @property
    def stride(self) -> int:
        return 2 ** (len(self.stage_channels) + 1)  # the first stem conv halves too

    @property
    def feature_size(self) -> tuple[int, int]:
        h, w = self.input_size
        return (h // self.stride, w // self.stride)

    @property
    def simcc_sizes(self) -> tuple[int, int]:
        """(x bins, y bins) = (W * r, H * r)."""
        h, w = self.input_size
        return (int(w * self.simcc_split_ratio), int(h * self.simcc_split_ratio))

    def mid_channels(self, stage: int) -> int:
        return int(self.stage_channels[stage] * self.expand_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RTMPoseConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"RTMPose config: unknown fields {unknown}")
        d = dict(d)
        for k in ("stem_channels", "stage_channels", "stage_blocks", "spp_kernels", "input_size"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class CSPNeXtBlock(nnx.Module):
    def __init__(self, channels: int, *, kernel_size: int, shortcut: bool, **kw):
        self.conv1 = ConvAct(channels, channels, 3, **kw)
        self.conv2 = DepthwiseSeparable(channels, channels, kernel_size, **kw)
        self.shortcut = shortcut

    def __call__(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.shortcut else y


class ChannelAttention(nnx.Module):
    """Global average pool -> 1x1 conv with bias -> hard sigmoid, scaling the input channels."""

    def __init__(self, channels: int, **kw):
        self.fc = ConvAct(channels, channels, 1, act=False, **kw)

    def __call__(self, x):
        w = self.fc(jnp.mean(x, axis=(1, 2), keepdims=True))
        return x * jax.nn.hard_sigmoid(w)


class CSPNeXtLayer(nnx.Module):
    def __init__(self, channels: int, mid: int, n: int, *, shortcut: bool, attention: bool, kernel_size: int, **kw):
        self.short_conv = ConvAct(channels, mid, 1, **kw)
        self.main_conv = ConvAct(channels, mid, 1, **kw)
        self.blocks = nnx.List([CSPNeXtBlock(mid, kernel_size=kernel_size, shortcut=shortcut, **kw) for _ in range(n)])
        self.attention = ChannelAttention(2 * mid, **kw) if attention else None
        self.final_conv = ConvAct(2 * mid, channels, 1, **kw)

    def __call__(self, x):
        short = self.short_conv(x)
        main = self.main_conv(x)
        for block in self.blocks:
            main = block(main)
        x = jnp.concatenate([main, short], axis=-1)
        if self.attention is not None:
            x = self.attention(x)
        return self.final_conv(x)


class CSPNeXtStage(nnx.Module):
    def __init__(self, cfg: RTMPoseConfig, i: int, in_channels: int, **kw):
        c = cfg.stage_channels[i]
        has_spp = i == cfg.spp_stage
        self.down = ConvAct(in_channels, c, 3, stride=2, **kw)
        self.spp = SPPBottleneck(c, c, cfg.spp_kernels, **kw) if has_spp else None
        self.csp = CSPNeXtLayer(c, cfg.mid_channels(i), cfg.stage_blocks[i], shortcut=not has_spp,
                                attention=cfg.channel_attention, kernel_size=cfg.block_kernel, **kw)

    def __call__(self, x):
        x = self.down(x)
        if self.spp is not None:
            x = self.spp(x)
        return self.csp(x)


class CSPNeXt(nnx.Module):
    def __init__(self, cfg: RTMPoseConfig, **kw):
        stem, cin = [], 3
        for j, c in enumerate(cfg.stem_channels):
            stem.append(ConvAct(cin, c, 3, stride=2 if j == 0 else 1, **kw))
            cin = c
        self.stem = nnx.List(stem)
        stages = []
        for i, c in enumerate(cfg.stage_channels):
            stages.append(CSPNeXtStage(cfg, i, cin, **kw))
            cin = c
        self.stages = nnx.List(stages)

    def __call__(self, x):
        for layer in self.stem:
            x = layer(x)
        for stage in self.stages:
            x = stage(x)
        return x


class ScaleNorm(nnx.Module):
    """``x / max(||x|| / sqrt(dim), eps) * g`` over the last axis, one learned scalar ``g``."""

    def __init__(self, dim: int, *, param_dtype: Dtype = jnp.float32):
        self.dim = dim
        self.g = nnx.Param(jnp.ones((1,), param_dtype), out_sharding=(None,), eager_sharding=False)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True)) * self.dim**-0.5
        return (x32 / jnp.maximum(norm, SCALE_NORM_EPS) * self.g[...]).astype(x.dtype)


class GatedAttentionUnit(nnx.Module):
    """mmpose ``RTMCCBlock`` as RTMPose configures it: self-attention, SiLU, no relative-position
    bias, no rotary encoding, a learned per-channel residual scale."""

    def __init__(self, dim: int, *, s: int, expansion: int, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.e, self.s = dim * expansion, s
        lin = dict(use_bias=False, axes=(None, None), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln = ScaleNorm(dim, param_dtype=param_dtype)
        self.uv = Linear(dim, 2 * self.e + s, **lin)
        self.gamma = nnx.Param(jax.random.uniform(rngs.params(), (2, s), param_dtype), out_sharding=(None, None),
                               eager_sharding=False)
        self.beta = nnx.Param(jax.random.uniform(rngs.params(), (2, s), param_dtype), out_sharding=(None, None),
                              eager_sharding=False)
        self.o = Linear(self.e, dim, **lin)
        self.res_scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,), eager_sharding=False)

    def __call__(self, x):
        uv = jax.nn.silu(self.uv(self.ln(x)))
        u, v, base = jnp.split(uv, [self.e, 2 * self.e], axis=-1)
        qk = base[..., None, :] * self.gamma[...].astype(base.dtype) + self.beta[...].astype(base.dtype)
        q, k = qk[..., 0, :], qk[..., 1, :]
        kernel = jnp.square(jax.nn.relu(jnp.einsum("bqs,bks->bqk", q, k) / math.sqrt(self.s)))
        y = self.o(u * jnp.einsum("bqk,bke->bqe", kernel, v))
        return x * self.res_scale[...].astype(x.dtype) + y


class RTMCCHead(nnx.Module):
    def __init__(self, cfg: RTMPoseConfig, **kw):
        fh, fw = cfg.feature_size
        lin = dict(use_bias=False, axes=(None, None), dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=kw["rngs"])
        self.final_layer = ConvAct(cfg.stage_channels[-1], cfg.num_keypoints, cfg.final_kernel, act=False, **kw)
        self.mlp_norm = ScaleNorm(fh * fw, param_dtype=kw["param_dtype"])
        self.mlp = Linear(fh * fw, cfg.hidden_dims, **lin)
        self.gau = GatedAttentionUnit(cfg.hidden_dims, s=cfg.gau_s, expansion=cfg.gau_expansion, dtype=kw["dtype"],
                                      param_dtype=kw["param_dtype"], rngs=kw["rngs"])
        wx, wy = cfg.simcc_sizes
        self.cls_x = Linear(cfg.hidden_dims, wx, **lin)
        self.cls_y = Linear(cfg.hidden_dims, wy, **lin)

    def __call__(self, x):
        x = self.final_layer(x)  # (B, h, w, K)
        b, h, w, k = x.shape
        # One token per keypoint holding its map flattened row-major, as torch.flatten(B, K, h, w).
        tokens = jnp.transpose(x, (0, 3, 1, 2)).reshape(b, k, h * w)
        tokens = self.gau(self.mlp(self.mlp_norm(tokens)))
        return self.cls_x(tokens), self.cls_y(tokens)


class RTMPose(nnx.Module):
    """Normalised crops ``(B, H, W, 3)`` -> SimCC logits ``(simcc_x, simcc_y)`` (see the module doc)."""

    def __init__(self, config: RTMPoseConfig, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=KeySequence(rngs))
        self.backbone = CSPNeXt(config, **kw)
        self.head = RTMCCHead(config, **kw)

    def __call__(self, crops: jax.Array) -> tuple[jax.Array, jax.Array]:
        if crops.ndim != 4 or tuple(crops.shape[1:]) != (*self.config.input_size, 3):
            raise ValueError(
                f"RTMPose expects (B, {self.config.input_size[0]}, {self.config.input_size[1]}, 3) crops, got {crops.shape}"
            )
        x, y = self.head(self.backbone(crops))
        return x.astype(jnp.float32), y.astype(jnp.float32)
