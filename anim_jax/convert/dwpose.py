"""DWPose's two ONNX files -> a converted DWPose directory (``anim-jax convert-pose``).

``yolox_l.onnx`` (person detector) and ``dw-ll_ucoco_384.onnx`` (whole-body RTMPose) are read with
``anim_jax.convert.onnx_graph``: by graph structure, never by initializer names, which exporters and
onnx-simplifier rename. Each network's sizes are first inferred from the sequence of its conv and
linear shapes (so other YOLOX and RTMPose sizes convert too), then the tables below list the
module's layers in call order and every node is matched strictly against them. BatchNorms are
folded into their convs whether or not the exporter already did.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from typing import Sequence

import numpy as np

from anim_jax import storage
from anim_jax.convert.mapping import CheckpointMismatchError
from anim_jax.convert.onnx_graph import OnnxGraph, OnnxGraphError, ParamOp, Slot, load_onnx, match_slots
from anim_jax.pose.rtmpose import RTMPoseConfig
from anim_jax.pose.yolox import YOLOXConfig

# ------------------------------------------------------------------------------------------------
# Layer tables (call order of anim_jax.pose.yolox.YOLOX / anim_jax.pose.rtmpose.RTMPose)


Sources = frozenset  # paths of the layers whose outputs a tensor derives from ("input": the network input)
INPUT: Sources = frozenset({"input"})


class _Table:
    """Collects a module's slots in call order while following which layers feed which: each method
    takes the sources of its input and returns those of its output (a residual or a concatenation
    is the union of its operands' sources)."""

    def __init__(self):
        self.slots: list[Slot] = []

    def conv(self, path, src: Sources, cin, cout, k, stride=1, groups=1) -> Sources:
        self.slots.append(Slot(path, "conv", (cout, cin // groups, k, k), stride=stride, groups=groups, inputs=src))
        return frozenset({path})

    def block(self, path, src: Sources, cin, cout, k, stride=1, depthwise=False) -> Sources:
        if depthwise:
            src = self.conv(f"{path}.dconv", src, cin, cin, k, stride, groups=cin)
            return self.conv(f"{path}.pconv", src, cin, cout, 1)
        return self.conv(path, src, cin, cout, k, stride)

    def linear(self, path, src: Sources, fan_in, fan_out) -> Sources:
        self.slots.append(Slot(path, "linear", (fan_in, fan_out), inputs=src))
        return frozenset({path})

    def param(self, path, kind, shape, pick) -> None:
        self.slots.append(Slot(path, kind, shape, pick=pick))

    def spp(self, path, src: Sources, c, kernels) -> Sources:
        x = self.conv(f"{path}.conv1", src, c, c // 2, 1)
        return self.conv(f"{path}.conv2", x, c // 2 * (len(kernels) + 1), c, 1)  # concat of x and its pools


def _yolox_csp(t: _Table, path, src, cin, cout, n, shortcut, dw) -> Sources:
    h = cout // 2
    x1 = t.conv(f"{path}.conv1", src, cin, h, 1)
    x2 = t.conv(f"{path}.conv2", src, cin, h, 1)
    for j in range(n):
        y = t.block(f"{path}.m.{j}.conv2", t.conv(f"{path}.m.{j}.conv1", x1, h, h, 1), h, h, 3, depthwise=dw)
        x1 = y | x1 if shortcut else y
    return t.conv(f"{path}.conv3", x1 | x2, 2 * h, cout, 1)


def yolox_slots(cfg: YOLOXConfig) -> list[Slot]:
    t = _Table()
    c, d, dw = cfg.base_channels, cfg.depths, cfg.depthwise
    x = t.conv("backbone.stem", INPUT, 12, c, 3)  # after Focus' space-to-depth of the input
    feats, cin = [], c
    for i, name in enumerate(("dark2", "dark3", "dark4", "dark5")):
        cout = c * 2 ** (i + 1)
        x = t.block(f"backbone.{name}.down", x, cin, cout, 3, 2, dw)
        if name == "dark5":
            x = t.spp("backbone.dark5.spp", x, cout, cfg.spp_kernels)
        x = _yolox_csp(t, f"backbone.{name}.csp", x, cout, cout, d[i], name != "dark5", dw)
        feats.append(x)
        cin = cout
    x2, x1, x0 = feats[1:]
    c0, c1, c2 = cfg.fpn_channels
    n = cfg.fpn_depth
    fpn_out0 = t.conv("neck.lateral_conv0", x0, c2, c1, 1)
    f_out0 = _yolox_csp(t, "neck.c3_p4", fpn_out0 | x1, 2 * c1, c1, n, False, dw)
    fpn_out1 = t.conv("neck.reduce_conv1", f_out0, c1, c0, 1)
    pan_out2 = _yolox_csp(t, "neck.c3_p3", fpn_out1 | x2, 2 * c0, c0, n, False, dw)
    p_out1 = t.block("neck.bu_conv2", pan_out2, c0, c0, 3, 2, dw)
    pan_out1 = _yolox_csp(t, "neck.c3_n3", p_out1 | fpn_out1, 2 * c0, c1, n, False, dw)
    p_out0 = t.block("neck.bu_conv1", pan_out1, c1, c1, 3, 2, dw)
    pan_out0 = _yolox_csp(t, "neck.c3_n4", p_out0 | fpn_out0, 2 * c1, c2, n, False, dw)
    h = cfg.head_channels
    for lvl, (cin, x) in enumerate(zip(cfg.fpn_channels, (pan_out2, pan_out1, pan_out0))):
        p = f"head.levels.{lvl}"
        stem = t.conv(f"{p}.stem", x, cin, h, 1)
        cls = t.block(f"{p}.cls_convs.1", t.block(f"{p}.cls_convs.0", stem, h, h, 3, depthwise=dw), h, h, 3,
                      depthwise=dw)
        t.conv(f"{p}.cls_pred", cls, h, cfg.num_classes, 1)
        reg = t.block(f"{p}.reg_convs.1", t.block(f"{p}.reg_convs.0", stem, h, h, 3, depthwise=dw), h, h, 3,
                      depthwise=dw)
        t.conv(f"{p}.reg_pred", reg, h, 4, 1)
        t.conv(f"{p}.obj_pred", reg, h, 1, 1)
    return t.slots


def rtmpose_slots(cfg: RTMPoseConfig) -> list[Slot]:
    t = _Table()
    x, cin = INPUT, 3
    for j, c in enumerate(cfg.stem_channels):
        x = t.conv(f"backbone.stem.{j}", x, cin, c, 3, stride=2 if j == 0 else 1)
        cin = c
    for i, c in enumerate(cfg.stage_channels):
        p = f"backbone.stages.{i}"
        x = t.conv(f"{p}.down", x, cin, c, 3, stride=2)
        has_spp = i == cfg.spp_stage
        if has_spp:
            x = t.spp(f"{p}.spp", x, c, cfg.spp_kernels)
        mid = cfg.mid_channels(i)
        short = t.conv(f"{p}.csp.short_conv", x, c, mid, 1)
        main = t.conv(f"{p}.csp.main_conv", x, c, mid, 1)
        for j in range(cfg.stage_blocks[i]):
            b = f"{p}.csp.blocks.{j}"
            y = t.block(f"{b}.conv2", t.conv(f"{b}.conv1", main, mid, mid, 3), mid, mid, cfg.block_kernel,
                        depthwise=True)
            main = y | main if not has_spp else y
        x = main | short
        if cfg.channel_attention:  # x * hardsigmoid(fc(pool(x)))
            x = x | t.conv(f"{p}.csp.attention.fc", x, 2 * mid, 2 * mid, 1)
        x = t.conv(f"{p}.csp.final_conv", x, 2 * mid, c, 1)
        cin = c
    fh, fw = cfg.feature_size
    hid, e, s = cfg.hidden_dims, cfg.hidden_dims * cfg.gau_expansion, cfg.gau_s
    wx, wy = cfg.simcc_sizes
    x = t.conv("head.final_layer", x, cin, cfg.num_keypoints, cfg.final_kernel)
    t.param("head.mlp_norm.g", "mul", (1,), pick="last")  # the last: the norm's 1/sqrt(d) is a Mul too
    tokens = t.linear("head.mlp", x, fh * fw, hid)
    t.param("head.gau.ln.g", "mul", (1,), pick="last")
    uv = t.linear("head.gau.uv", tokens, hid, 2 * e + s)
    t.param("head.gau.gamma", "mul", (2, s), pick="first")
    t.param("head.gau.beta", "add", (2, s), pick="first")
    o = t.linear("head.gau.o", uv, e, hid)
    t.param("head.gau.res_scale", "mul", (hid,), pick="first")
    tokens = tokens | o  # residual
    t.linear("head.cls_x", tokens, hid, wx)
    t.linear("head.cls_y", tokens, hid, wy)
    return t.slots


# ------------------------------------------------------------------------------------------------
# Inferring the sizes from the graph


def _convs(graph: OnnxGraph) -> list[ParamOp]:
    return [op for op in graph.ops if op.kind == "conv"]


def _stride2_indices(convs: Sequence[ParamOp]) -> list[int]:
    return [i for i, op in enumerate(convs) if op.stride != (1, 1)]


def _fail(graph: OnnxGraph, what: str, detail: str) -> OnnxGraphError:
    return OnnxGraphError(f"{graph.source} is not {what}: {detail}")


def infer_yolox_config(graph: OnnxGraph) -> YOLOXConfig:
    """YOLOX sizes from the conv sequence: the Focus stem's width, the bottleneck count of each CSP
    layer (counted between the stride-2 convs), the head's width and class count."""
    what = "a YOLOX detector"
    convs = _convs(graph)
    if not convs or convs[0].weight.shape[1] != 12:
        got = convs[0].describe() if convs else "no Conv at all"
        raise _fail(graph, what, f"its first Conv should be the Focus stem with 12 input channels, found {got}")
    base = convs[0].weight.shape[0]
    depthwise = any(op.groups > 1 for op in convs)
    s2 = _stride2_indices(convs)
    if len(s2) != 6:
        raise _fail(graph, what, f"{len(s2)} stride-2 Convs, expected 6 (dark2..dark5, two bottom-up convs)")

    def blocks(lo, hi):  # 3x3 stride-1 convs of bottlenecks (their depthwise half when depthwise)
        return sum(1 for op in convs[lo + 1:hi] if op.weight.shape[2] == 3 and op.stride == (1, 1)
                   and (op.groups > 1) == depthwise)

    per_level = 12 if depthwise else 8  # convs of one head level
    if len(convs) - s2[-1] < 3 * per_level:
        raise _fail(graph, what, f"the last {len(convs) - s2[-1]} Convs cannot hold YOLOX's three head levels")
    segments = [blocks(a, b) for a, b in zip(s2, s2[1:] + [len(convs)])]
    fpn = segments[4]
    depths = (segments[0], segments[1], segments[2], segments[3] - 2 * fpn)
    cls = convs[-(5 if not depthwise else 7)]  # cls_pred, then two reg convs, reg_pred and obj_pred
    obj = convs[-1]
    cfg = YOLOXConfig(base_channels=base, depths=depths, fpn_depth=fpn, head_channels=obj.weight.shape[1],
                      num_classes=cls.weight.shape[0], depthwise=depthwise,
                      spp_kernels=graph.pool_kernels or YOLOXConfig().spp_kernels)
    if min(depths) < 1 or fpn < 1:
        raise _fail(graph, what, f"its convs do not form YOLOX's CSP stages (inferred {cfg})")
    return cfg


def infer_rtmpose_config(graph: OnnxGraph) -> RTMPoseConfig:
    """RTMPose sizes: stem widths, per-stage channels / blocks / SPP / channel attention (counted
    between the stride-2 convs), the head's kernel, keypoints, GAU widths and SimCC bins; the crop
    size from the graph input when static, else from the bins and the flattened feature map."""
    what = "an RTMPose (CSPNeXt + RTMCC head) network"
    convs = _convs(graph)
    linears = [op for op in graph.ops if op.kind == "linear"]
    if not convs or convs[0].weight.shape[1] != 3 or convs[0].stride != (2, 2):
        got = convs[0].describe() if convs else "no Conv at all"
        raise _fail(graph, what, f"its first Conv should be the stride-2 stem conv on 3 channels, found {got}")
    if len(linears) != 5:
        raise _fail(graph, what, f"{len(linears)} Linear (MatMul/Gemm) layers, the RTMCC head has 5")
    s2 = _stride2_indices(convs)
    if len(s2) < 2 or not any(op.groups > 1 for op in convs):
        raise _fail(graph, what, "no CSPNeXt stages (stride-2 convs followed by depthwise blocks)")
    stem = tuple(op.weight.shape[0] for op in convs[: s2[1]])
    stage_ch, blocks, spp_stage, attention, ratio = [], [], -1, None, None
    head = convs[-1]
    bounds = s2[1:] + [len(convs) - 1]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        seg = convs[lo:hi]
        c = seg[0].weight.shape[0]
        n = sum(1 for op in seg if op.groups > 1)
        extra = len(seg) - 1 - 4 - 3 * n  # = 2 * spp + attention - 1 (short, main, final, attention: 4)
        spp, att = divmod(extra + 1, 2)
        if spp not in (0, 1) or att not in (0, 1) or n < 1:
            raise _fail(graph, what, f"stage {i} (from {seg[0].node}) does not have CSPNeXt's layout")
        if spp:
            spp_stage = i
        attention = bool(att) if attention is None else attention
        short = seg[1 + 2 * spp]
        ratio = short.weight.shape[0] / c
        stage_ch.append(c)
        blocks.append(n)
    dw = next(op for op in convs if op.groups > 1)
    k = len(stage_ch)
    x_bins, y_bins = linears[3].weight.shape[1], linears[4].weight.shape[1]
    flat, hidden = linears[0].weight.shape
    e = linears[2].weight.shape[0]
    s = linears[1].weight.shape[1] - 2 * e
    stride = 2 ** (k + 1)
    images = [shape for shape in graph.input_shapes.values() if len(shape) == 4]
    if images and all(isinstance(d, int) and d > 0 for d in images[0][2:]):
        input_size = (images[0][2], images[0][3])
        split = x_bins / input_size[1]
    else:
        split = math.sqrt(x_bins * y_bins / (flat * stride * stride))
        input_size = (round(y_bins / split), round(x_bins / split))
    cfg = RTMPoseConfig(
        stem_channels=stem, stage_channels=tuple(stage_ch), stage_blocks=tuple(blocks), spp_stage=spp_stage,
        expand_ratio=ratio if ratio is not None else 0.5, channel_attention=bool(attention),
        block_kernel=dw.weight.shape[2], spp_kernels=graph.pool_kernels or RTMPoseConfig().spp_kernels,
        num_keypoints=head.weight.shape[0], final_kernel=head.weight.shape[2],
        hidden_dims=hidden, gau_s=s, gau_expansion=max(e // max(hidden, 1), 1), input_size=input_size,
        simcc_split_ratio=float(split),
    )
    if cfg.simcc_sizes != (x_bins, y_bins) or e != hidden * cfg.gau_expansion:
        raise _fail(graph, what, f"inconsistent head sizes (SimCC bins {x_bins}, {y_bins}; inferred {cfg})")
    return cfg


# ------------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass
class DWPoseConversion:
    out: pathlib.Path
    detector: YOLOXConfig
    pose: RTMPoseConfig
    detector_params: int
    pose_params: int
    folded_batchnorms: int
    seconds: float


def _check_against_model(model, arrays: dict[str, np.ndarray], source: str) -> None:
    from anim_jax.convert.mapping import flat_params

    params = {k: tuple(v.shape) for k, v in flat_params(model).items()}
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    misshaped = sorted(f"{k}: graph {arrays[k].shape}, model {params[k]}" for k in set(params) & set(arrays)
                       if tuple(arrays[k].shape) != params[k])
    if missing or unexpected or misshaped:
        msg = [f"{source}: the layer table does not cover the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                msg.append(f"  {len(items)} {title}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        raise CheckpointMismatchError("\n".join(msg))


def read_detector(path: str | os.PathLike):
    """``(YOLOXConfig, {nnx path: float32 array})`` from a YOLOX ONNX file."""
    graph = load_onnx(path, "detector ONNX file")
    cfg = infer_yolox_config(graph)
    return cfg, graph, match_slots(graph, yolox_slots(cfg))


def read_pose(path: str | os.PathLike):
    """``(RTMPoseConfig, {nnx path: float32 array})`` from an RTMPose ONNX file."""
    graph = load_onnx(path, "pose ONNX file")
    cfg = infer_rtmpose_config(graph)
    return cfg, graph, match_slots(graph, rtmpose_slots(cfg))


def _filled(model_cls, cfg, arrays, source):
    import jax.numpy as jnp
    from flax import nnx

    from anim_jax.convert.mapping import flat_params

    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    _check_against_model(model, arrays, source)
    for k, var in flat_params(model).items():
        value = np.asarray(arrays[k])
        if value.dtype.kind != "f":
            raise CheckpointMismatchError(f"{source}: {k} has dtype {value.dtype}, expected floating point")
        var.value = jnp.asarray(value, jnp.float32)
    return model


def convert_dwpose(
    detector_onnx: str | os.PathLike,
    pose_onnx: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
) -> DWPoseConversion:
    """Converts DWPose's ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` (or other YOLOX / RTMPose
    sizes) into the directory ``out_dir`` that :func:`anim_jax.pose.networks.load_dwpose` reads.

    Nothing is written unless both files convert; ``out_dir`` appears complete or not at all and
    an existing non-empty one is replaced only with ``overwrite``.
    """
    from anim_jax import __version__
    from anim_jax.pose.networks import save_dwpose
    from anim_jax.pose.rtmpose import RTMPose
    from anim_jax.pose.yolox import YOLOX

    t0 = time.perf_counter()
    out = storage.as_path(out_dir)
    if storage.is_url(out):  # a missing bucket: one line now, not an upload error after the work
        storage.check_bucket(out, "--out")
    if not dry_run and out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"output {str(out)!r} exists and is not an empty directory (pass --overwrite to replace it)")
    det_cfg, det_graph, det_arrays = read_detector(detector_onnx)
    pose_cfg, pose_graph, pose_arrays = read_pose(pose_onnx)
    detector = _filled(YOLOX, det_cfg, det_arrays, det_graph.source)
    pose_net = _filled(RTMPose, pose_cfg, pose_arrays, pose_graph.source)
    folded = sum(op.folded_batchnorm for g in (det_graph, pose_graph) for op in g.ops)
    if not dry_run:
        save_dwpose(out, detector, pose_net, overwrite=overwrite, provenance={
            "tool": f"anim-jax {__version__} convert-pose",
            "sources": {"detector": str(detector_onnx), "pose": str(pose_onnx)},
        })
    return DWPoseConversion(
        out=out, detector=det_cfg, pose=pose_cfg,
        detector_params=sum(int(np.prod(v.shape)) for v in det_arrays.values()),
        pose_params=sum(int(np.prod(v.shape)) for v in pose_arrays.values()),
        folded_batchnorms=folded, seconds=time.perf_counter() - t0,
    )


__all__ = [
    "DWPoseConversion",
    "OnnxGraphError",
    "convert_dwpose",
    "infer_rtmpose_config",
    "infer_yolox_config",
    "read_detector",
    "read_pose",
    "rtmpose_slots",
    "yolox_slots",
]
