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

from anim_jax.convert.mapping import CheckpointMismatchError
from anim_jax.convert.onnx_graph import OnnxGraph, OnnxGraphError, ParamOp, Slot, load_onnx, match_slots
from anim_jax.pose.rtmpose import RTMPoseConfig
from anim_jax.pose.yolox import YOLOXConfig

# ------------------------------------------------------------------------------------------------
# Layer tables (call order of anim_jax.pose.yolox.YOLOX / anim_jax.pose.rtmpose.RTMPose)


def _conv(path, cin, cout, k, stride=1, groups=1) -> Slot:
    return Slot(path, "conv", (cout, cin // groups, k, k), stride=stride, groups=groups)


def _block(path, cin, cout, k, stride=1, depthwise=False) -> list[Slot]:
    if depthwise:
        return [_conv(f"{path}.dconv", cin, cin, k, stride, groups=cin), _conv(f"{path}.pconv", cin, cout, 1)]
    return [_conv(path, cin, cout, k, stride)]


def _yolox_csp(path, cin, cout, n, dw) -> list[Slot]:
    h = cout // 2
    slots = [_conv(f"{path}.conv1", cin, h, 1), _conv(f"{path}.conv2", cin, h, 1)]
    for j in range(n):
        slots += [_conv(f"{path}.m.{j}.conv1", h, h, 1), *_block(f"{path}.m.{j}.conv2", h, h, 3, depthwise=dw)]
    return slots + [_conv(f"{path}.conv3", 2 * h, cout, 1)]


def yolox_slots(cfg: YOLOXConfig) -> list[Slot]:
    c, d, dw = cfg.base_channels, cfg.depths, cfg.depthwise
    slots = [_conv("backbone.stem", 12, c, 3)]
    cin = c
    for i, name in enumerate(("dark2", "dark3", "dark4", "dark5")):
        cout = c * 2 ** (i + 1)
        slots += _block(f"backbone.{name}.down", cin, cout, 3, 2, dw)
        if name == "dark5":
            k = len(cfg.spp_kernels)
            slots += [_conv("backbone.dark5.spp.conv1", cout, cout // 2, 1),
                      _conv("backbone.dark5.spp.conv2", cout // 2 * (k + 1), cout, 1)]
        slots += _yolox_csp(f"backbone.{name}.csp", cout, cout, d[i], dw)
        cin = cout
    c0, c1, c2 = cfg.fpn_channels
    n = cfg.fpn_depth
    slots += [_conv("neck.lateral_conv0", c2, c1, 1), *_yolox_csp("neck.c3_p4", 2 * c1, c1, n, dw),
              _conv("neck.reduce_conv1", c1, c0, 1), *_yolox_csp("neck.c3_p3", 2 * c0, c0, n, dw),
              *_block("neck.bu_conv2", c0, c0, 3, 2, dw), *_yolox_csp("neck.c3_n3", 2 * c0, c1, n, dw),
              *_block("neck.bu_conv1", c1, c1, 3, 2, dw), *_yolox_csp("neck.c3_n4", 2 * c1, c2, n, dw)]
    h = cfg.head_channels
    for lvl, cin in enumerate(cfg.fpn_channels):
        p = f"head.levels.{lvl}"
        slots += [_conv(f"{p}.stem", cin, h, 1)]
        slots += _block(f"{p}.cls_convs.0", h, h, 3, depthwise=dw) + _block(f"{p}.cls_convs.1", h, h, 3, depthwise=dw)
        slots += [_conv(f"{p}.cls_pred", h, cfg.num_classes, 1)]
        slots += _block(f"{p}.reg_convs.0", h, h, 3, depthwise=dw) + _block(f"{p}.reg_convs.1", h, h, 3, depthwise=dw)
        slots += [_conv(f"{p}.reg_pred", h, 4, 1), _conv(f"{p}.obj_pred", h, 1, 1)]
    return slots


def rtmpose_slots(cfg: RTMPoseConfig) -> list[Slot]:
    slots, cin = [], 3
    for j, c in enumerate(cfg.stem_channels):
        slots.append(_conv(f"backbone.stem.{j}", cin, c, 3, stride=2 if j == 0 else 1))
        cin = c
    for i, c in enumerate(cfg.stage_channels):
        p = f"backbone.stages.{i}"
        slots.append(_conv(f"{p}.down", cin, c, 3, stride=2))
        if i == cfg.spp_stage:
            k = len(cfg.spp_kernels)
            slots += [_conv(f"{p}.spp.conv1", c, c // 2, 1), _conv(f"{p}.spp.conv2", c // 2 * (k + 1), c, 1)]
        mid = cfg.mid_channels(i)
        slots += [_conv(f"{p}.csp.short_conv", c, mid, 1), _conv(f"{p}.csp.main_conv", c, mid, 1)]
        for j in range(cfg.stage_blocks[i]):
            b = f"{p}.csp.blocks.{j}"
            slots += [_conv(f"{b}.conv1", mid, mid, 3), *_block(f"{b}.conv2", mid, mid, cfg.block_kernel, depthwise=True)]
        if cfg.channel_attention:
            slots.append(_conv(f"{p}.csp.attention.fc", 2 * mid, 2 * mid, 1))
        slots.append(_conv(f"{p}.csp.final_conv", 2 * mid, c, 1))
        cin = c
    fh, fw = cfg.feature_size
    hid, e, s = cfg.hidden_dims, cfg.hidden_dims * cfg.gau_expansion, cfg.gau_s
    wx, wy = cfg.simcc_sizes
    slots += [
        _conv("head.final_layer", cin, cfg.num_keypoints, cfg.final_kernel),
        Slot("head.mlp_norm.g", "mul", (1,), pick="last"),  # the last: the norm's 1/sqrt(d) is a Mul too
        Slot("head.mlp", "linear", (fh * fw, hid)),
        Slot("head.gau.ln.g", "mul", (1,), pick="last"),
        Slot("head.gau.uv", "linear", (hid, 2 * e + s)),
        Slot("head.gau.gamma", "mul", (2, s), pick="first"),
        Slot("head.gau.beta", "add", (2, s), pick="first"),
        Slot("head.gau.o", "linear", (e, hid)),
        Slot("head.gau.res_scale", "mul", (hid,), pick="first"),
        Slot("head.cls_x", "linear", (hid, wx)),
        Slot("head.cls_y", "linear", (hid, wy)),
    ]
    return slots


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

    segments = [blocks(a, b) for a, b in zip(s2, s2[1:] + [len(convs)])]
    fpn = segments[4]
    depths = (segments[0], segments[1], segments[2], segments[3] - 2 * fpn)
    cls = convs[-(5 if not depthwise else 7)]  # cls_pred, then two reg convs, reg_pred and obj_pred
    obj = convs[-1]
    cfg = YOLOXConfig(base_channels=base, depths=depths, fpn_depth=fpn, head_channels=obj.weight.shape[1],
                      num_classes=cls.weight.shape[0], depthwise=depthwise,
                      spp_kernels=graph.max_pool_kernels() or YOLOXConfig().spp_kernels)
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
    stem = tuple(op.weight.shape[0] for op in convs[: s2[1]]) if len(s2) > 1 else ()
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
    shapes = [s for s in graph.input_shapes.values() if len(s) == 4]
    if shapes and all(isinstance(d, int) and d > 0 for d in shapes[0][2:]):
        input_size = (shapes[0][2], shapes[0][3])
        split = x_bins / input_size[1]
    else:
        split = math.sqrt(x_bins * y_bins / (flat * stride * stride))
        input_size = (round(y_bins / split), round(x_bins / split))
    cfg = RTMPoseConfig(
        stem_channels=stem, stage_channels=tuple(stage_ch), stage_blocks=tuple(blocks), spp_stage=spp_stage,
        expand_ratio=ratio if ratio is not None else 0.5, channel_attention=bool(attention),
        block_kernel=dw.weight.shape[2], spp_kernels=graph.max_pool_kernels() or RTMPoseConfig().spp_kernels, num_keypoints=head.weight.shape[0], final_kernel=head.weight.shape[2],
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
    out = pathlib.Path(out_dir)
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
