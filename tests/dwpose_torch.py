"""PyTorch stand-ins for DWPose's two networks, exported to ONNX as references.

DWPose's ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` cannot be downloaded here, so the tests (and
``benchmarks/pose.py``) build networks with the same structure and operator set in PyTorch: YOLOX's
CSPDarknet + PAFPN + decoupled head as Megvii's export runs it (SiLU written as ``x * sigmoid(x)``,
decoding left to the host), and RTMPose's CSPNeXt + RTMCC head as mmpose defines them (ScaleNorm
through ``torch.linalg.norm`` as under ONNX export, Hardsigmoid channel attention, the gated
attention unit). Written from the architectures' descriptions; sizes come from the configs in
``anim_jax.pose``. Every parameter and BatchNorm statistic is randomised by :func:`randomize_`.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
from torch import nn


class ExportSiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> SiLU, the unit of both backbones."""

    def __init__(self, cin, cout, k, stride=1, groups=1, eps=1e-3, act=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = act or ExportSiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DWSep(nn.Module):
    def __init__(self, cin, cout, k, stride=1, **kw):
        super().__init__()
        self.dconv = ConvBN(cin, cin, k, stride, groups=cin, **kw)
        self.pconv = ConvBN(cin, cout, 1, **kw)

    def forward(self, x):
        return self.pconv(self.dconv(x))


def block(cin, cout, k, stride=1, depthwise=False, **kw):
    return DWSep(cin, cout, k, stride, **kw) if depthwise else ConvBN(cin, cout, k, stride, **kw)


class SPP(nn.Module):
    def __init__(self, cin, cout, kernels, **kw):
        super().__init__()
        self.conv1 = ConvBN(cin, cin // 2, 1, **kw)
        self.pools = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in kernels])
        self.conv2 = ConvBN(cin // 2 * (len(kernels) + 1), cout, 1, **kw)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [p(x) for p in self.pools], 1))


# ------------------------------------------------------------------------------------------------
# YOLOX


class YBottleneck(nn.Module):
    def __init__(self, c, shortcut, dw):
        super().__init__()
        self.conv1 = ConvBN(c, c, 1)
        self.conv2 = block(c, c, 3, depthwise=dw)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.shortcut else y


class YCSP(nn.Module):
    def __init__(self, cin, cout, n, shortcut, dw):
        super().__init__()
        h = cout // 2
        self.conv1, self.conv2 = ConvBN(cin, h, 1), ConvBN(cin, h, 1)
        self.conv3 = ConvBN(2 * h, cout, 1)
        self.m = nn.Sequential(*[YBottleneck(h, shortcut, dw) for _ in range(n)])

    def forward(self, x):
        x1, x2 = self.conv1(x), self.conv2(x)
        return self.conv3(torch.cat((self.m(x1), x2), 1))


class TorchYOLOX(nn.Module):
    """YOLOX in eval mode, returning (B, A, 5 + classes) = [reg, sigmoid(obj), sigmoid(cls)]."""

    def __init__(self, cfg):
        super().__init__()
        c, d, dw, n = cfg.base_channels, cfg.depths, cfg.depthwise, cfg.fpn_depth
        self.stem = ConvBN(12, c, 3)
        stages = []
        for i in range(4):
            cin, cout = c * 2**i, c * 2 ** (i + 1)
            layers = [block(cin, cout, 3, 2, dw)]
            if i == 3:
                layers.append(SPP(cout, cout, cfg.spp_kernels))
            layers.append(YCSP(cout, cout, d[i], i != 3, dw))
            stages.append(nn.Sequential(*layers))
        self.dark2, self.dark3, self.dark4, self.dark5 = stages
        c0, c1, c2 = cfg.fpn_channels
        self.lateral_conv0 = ConvBN(c2, c1, 1)
        self.c3_p4 = YCSP(2 * c1, c1, n, False, dw)
        self.reduce_conv1 = ConvBN(c1, c0, 1)
        self.c3_p3 = YCSP(2 * c0, c0, n, False, dw)
        self.bu_conv2 = block(c0, c0, 3, 2, dw)
        self.c3_n3 = YCSP(2 * c0, c1, n, False, dw)
        self.bu_conv1 = block(c1, c1, 3, 2, dw)
        self.c3_n4 = YCSP(2 * c1, c2, n, False, dw)
        h = cfg.head_channels
        self.stems = nn.ModuleList([ConvBN(ci, h, 1) for ci in (c0, c1, c2)])
        self.cls_convs = nn.ModuleList([nn.Sequential(block(h, h, 3, depthwise=dw), block(h, h, 3, depthwise=dw))
                                        for _ in range(3)])
        self.reg_convs = nn.ModuleList([nn.Sequential(block(h, h, 3, depthwise=dw), block(h, h, 3, depthwise=dw))
                                        for _ in range(3)])
        self.cls_preds = nn.ModuleList([nn.Conv2d(h, cfg.num_classes, 1) for _ in range(3)])
        self.reg_preds = nn.ModuleList([nn.Conv2d(h, 4, 1) for _ in range(3)])
        self.obj_preds = nn.ModuleList([nn.Conv2d(h, 1, 1) for _ in range(3)])
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        x = torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1)
        x = self.dark2(self.stem(x))
        x2 = self.dark3(x)
        x1 = self.dark4(x2)
        x0 = self.dark5(x1)
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.c3_p4(torch.cat([self.up(fpn_out0), x1], 1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.c3_p3(torch.cat([self.up(fpn_out1), x2], 1))
        pan_out1 = self.c3_n3(torch.cat([self.bu_conv2(pan_out2), fpn_out1], 1))
        pan_out0 = self.c3_n4(torch.cat([self.bu_conv1(pan_out1), fpn_out0], 1))
        outs = []
        for k, f in enumerate((pan_out2, pan_out1, pan_out0)):
            f = self.stems[k](f)
            cls = self.cls_preds[k](self.cls_convs[k](f))
            reg_feat = self.reg_convs[k](f)
            out = torch.cat([self.reg_preds[k](reg_feat), self.obj_preds[k](reg_feat).sigmoid(), cls.sigmoid()], 1)
            outs.append(out.flatten(start_dim=2))
        return torch.cat(outs, dim=2).permute(0, 2, 1)


# ------------------------------------------------------------------------------------------------
# RTMPose


class NeXtBlock(nn.Module):
    def __init__(self, c, k, shortcut):
        super().__init__()
        kw = dict(eps=1e-5, act=nn.SiLU())
        self.conv1 = ConvBN(c, c, 3, **kw)
        self.conv2 = DWSep(c, c, k, **kw)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.shortcut else y


class ChannelAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(c, c, 1, bias=True)
        self.act = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.act(self.fc(self.pool(x)))


class NeXtCSP(nn.Module):
    def __init__(self, c, mid, n, shortcut, attention, k):
        super().__init__()
        kw = dict(eps=1e-5, act=nn.SiLU())
        self.short_conv, self.main_conv = ConvBN(c, mid, 1, **kw), ConvBN(c, mid, 1, **kw)
        self.blocks = nn.Sequential(*[NeXtBlock(mid, k, shortcut) for _ in range(n)])
        self.attention = ChannelAttention(2 * mid) if attention else None
        self.final_conv = ConvBN(2 * mid, c, 1, **kw)

    def forward(self, x):
        short = self.short_conv(x)
        main = self.blocks(self.main_conv(x))
        x = torch.cat((main, short), 1)
        if self.attention is not None:
            x = self.attention(x)
        return self.final_conv(x)


class ScaleNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.scale, self.eps = dim**-0.5, eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        norm = torch.linalg.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class GAU(nn.Module):
    def __init__(self, dim, s, expansion):
        super().__init__()
        self.e, self.s = dim * expansion, s
        self.ln = ScaleNorm(dim)
        self.uv = nn.Linear(dim, 2 * self.e + s, bias=False)
        self.gamma = nn.Parameter(torch.rand(2, s))
        self.beta = nn.Parameter(torch.rand(2, s))
        self.o = nn.Linear(self.e, dim, bias=False)
        self.res_scale = nn.Parameter(torch.ones(dim))
        self.act = nn.SiLU()

    def forward(self, x):
        uv = self.act(self.uv(self.ln(x)))
        u, v, base = torch.split(uv, [self.e, self.e, self.s], dim=2)
        base = base.unsqueeze(2) * self.gamma[None, None, :] + self.beta
        q, k = torch.unbind(base, dim=2)
        kernel = torch.square(torch.relu(torch.bmm(q, k.permute(0, 2, 1)) / math.sqrt(self.s)))
        main = self.o(u * torch.bmm(kernel, v))
        return x * self.res_scale + main


class TorchRTMPose(nn.Module):
    """CSPNeXt + RTMCC head in eval mode: normalised (B, 3, H, W) crops -> (simcc_x, simcc_y)."""

    def __init__(self, cfg):
        super().__init__()
        kw = dict(eps=1e-5, act=nn.SiLU())
        stem, cin = [], 3
        for j, c in enumerate(cfg.stem_channels):
            stem.append(ConvBN(cin, c, 3, 2 if j == 0 else 1, **kw))
            cin = c
        self.stem = nn.Sequential(*stem)
        stages = []
        for i, c in enumerate(cfg.stage_channels):
            spp = i == cfg.spp_stage
            layers = [ConvBN(cin, c, 3, 2, **kw)]
            if spp:
                layers.append(SPP(c, c, cfg.spp_kernels, **kw))
            layers.append(NeXtCSP(c, cfg.mid_channels(i), cfg.stage_blocks[i], not spp, cfg.channel_attention,
                                  cfg.block_kernel))
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.Sequential(*stages)
        fh, fw = cfg.feature_size
        wx, wy = cfg.simcc_sizes
        self.final_layer = nn.Conv2d(cin, cfg.num_keypoints, cfg.final_kernel, 1, cfg.final_kernel // 2)
        self.mlp = nn.Sequential(ScaleNorm(fh * fw), nn.Linear(fh * fw, cfg.hidden_dims, bias=False))
        self.gau = GAU(cfg.hidden_dims, cfg.gau_s, cfg.gau_expansion)
        self.cls_x = nn.Linear(cfg.hidden_dims, wx, bias=False)
        self.cls_y = nn.Linear(cfg.hidden_dims, wy, bias=False)

    def forward(self, x):
        x = self.final_layer(self.stages(self.stem(x)))
        x = self.gau(self.mlp(torch.flatten(x, 2)))
        return self.cls_x(x), self.cls_y(x)


# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm statistic drawn at random, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.5 / math.sqrt(fan_in)))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        elif isinstance(m, ScaleNorm):
            m.g.copy_(torch.rand(1, generator=g) + 0.5)
        elif isinstance(m, GAU):
            m.gamma.copy_(torch.randn(m.gamma.shape, generator=g))
            m.beta.copy_(torch.randn(m.beta.shape, generator=g))
            m.res_scale.copy_(torch.rand(m.res_scale.shape, generator=g) + 0.5)
    return model.eval()


def export_onnx(model: nn.Module, example: torch.Tensor, outputs: list[str], *, fold: bool = True,
                export_params: bool = True) -> bytes:
    """``torch.onnx.export`` (the TorchScript exporter, as DWPose's files were made, opset 11) with a
    dynamic batch. ``fold=True`` is the default export (BatchNorm folded into the convs, Linear
    weights stored transposed); ``fold=False`` keeps BatchNormalization nodes and Transpose nodes."""
    import warnings

    model.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), f, dynamo=False, opset_version=11, input_names=["input"], output_names=outputs,
            dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            do_constant_folding=fold, export_params=export_params,
            training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE,
        )
    return f.getvalue()


def run_onnx(data: bytes, x: np.ndarray, threads: int | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


DET_HW = (64, 96)  # tiny detector input; not square, so a swapped H/W fails


@functools.lru_cache(maxsize=None)
def tiny_exports(fold: bool) -> tuple[bytes, bytes]:
    """(detector ONNX, pose ONNX) of the tiny configs, randomised, exported once per process."""
    from anim_jax.pose.rtmpose import RTMPoseConfig
    from anim_jax.pose.yolox import YOLOXConfig

    pose_cfg = RTMPoseConfig.tiny()
    det = export_onnx(randomize_(TorchYOLOX(YOLOXConfig.tiny()), seed=1), torch.zeros(1, 3, *DET_HW), ["output"],
                      fold=fold)
    pose = export_onnx(randomize_(TorchRTMPose(pose_cfg), seed=2), torch.zeros(1, 3, *pose_cfg.input_size),
                       ["simcc_x", "simcc_y"], fold=fold)
    return det, pose
