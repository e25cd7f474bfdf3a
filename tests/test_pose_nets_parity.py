"""DWPose's networks in JAX against onnxruntime running the ONNX export of the same network.

The real ``yolox_l.onnx`` / ``dw-ll_ucoco_384.onnx`` cannot be fetched here, so PyTorch stand-ins with
the same structure and operator set at reduced width (``tests/dwpose_torch.py``), every parameter
and BatchNorm statistic random, are exported with ``torch.onnx.export`` (dynamic batch) twice: as the
exporter does by default (BatchNorm folded into the convs, Linear weights stored transposed under
anonymous names) and with BatchNorm and Transpose nodes kept. onnxruntime runs each export; the
converter reads it; the JAX networks must give the same outputs at batch 2, with XLA's direct
convolutions and with every 3x3 stride-1 convolution as a Winograd convolution (the CPU default,
``anim_jax.pose.winograd``; at these widths only ``min_channels=1`` selects them).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dwpose_torch import DET_HW, TorchRTMPose, TorchYOLOX, run_onnx, tiny_exports
from flax import nnx

from anim_jax.convert.dwpose import convert_dwpose
from anim_jax.pose.layers import use_winograd
from anim_jax.pose.networks import load_dwpose
from anim_jax.pose.rtmpose import RTMPoseConfig
from anim_jax.pose.yolox import YOLOXConfig

# One jitted call for both export forms: same graph structure and shapes, so one compile per network.
_apply = nnx.jit(lambda model, x: model(x))
CONVS = ["direct", "winograd"]
# Per element, relative to each output's scale (docs/numerics.md): the direct path reaches 0.40 of its
# bound; Winograd, with every 3x3 layer of the tiny networks transformed, rounds more (0.83 of the
# direct bound, on the detector's scores), so its bound is 5x (reached 0.17 of it).
TOL = {"direct": dict(rtol=1e-4, atol_frac=1e-5), "winograd": dict(rtol=5e-4, atol_frac=5e-5)}


def _prepared(model, conv: str):
    if conv == "direct":
        return model
    prepared = use_winograd(model, min_channels=1)
    assert prepared is not model
    return prepared


def _close(out, ref, *, rtol: float, atol_frac: float, what: str):
    """Per element ``|out - ref| <= atol + rtol * |ref|``, atol a fraction of the output's scale."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape}, reference {ref.shape}"
    atol = atol_frac * np.abs(ref).max()
    err = np.abs(out - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} elements off, worst {err.max():.3g} (atol {atol:.3g})"


@pytest.fixture(scope="module", params=[True, False], ids=["bn-folded", "bn-kept"])
def exported(request, tmp_path_factory):
    """Both tiny networks exported (one form per param), converted, and loaded back."""
    fold = request.param
    det_cfg, pose_cfg = YOLOXConfig.tiny(), RTMPoseConfig.tiny()
    det_onnx, pose_onnx = tiny_exports(fold)
    d = tmp_path_factory.mktemp("dwpose")
    (d / "det.onnx").write_bytes(det_onnx)
    (d / "pose.onnx").write_bytes(pose_onnx)
    report = convert_dwpose(d / "det.onnx", d / "pose.onnx", d / "converted")
    detector, pose_net = load_dwpose(d / "converted")
    return dict(fold=fold, report=report, det_onnx=det_onnx, pose_onnx=pose_onnx, detector=detector,
                pose_net=pose_net, det_cfg=det_cfg, pose_cfg=pose_cfg)


def test_converter_infers_the_architectures_and_folds_batchnorm(exported):
    report = exported["report"]
    assert report.detector == exported["det_cfg"]
    assert report.pose == exported["pose_cfg"]
    # Every ConvBN of both networks: folded at export (0 left in the graph) or by the converter.
    det_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in TorchYOLOX(exported["det_cfg"]).modules())
    pose_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in TorchRTMPose(exported["pose_cfg"]).modules())
    assert report.folded_batchnorms == (0 if exported["fold"] else det_bn + pose_bn)


@pytest.mark.parametrize("conv", CONVS)
def test_yolox_matches_onnxruntime(exported, conv):
    # Pixels scaled to [0, 1]: random weights are not trained for 0..255, and at that range every
    # score of the tiny network saturates to exactly 0 or 1, which would leave them untested.
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, *DET_HW, 3)).astype(np.float32)
    images[1, 40:, :, :] = 114 / 255  # a letterbox band
    (ref,) = run_onnx(exported["det_onnx"], np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = _apply(_prepared(exported["detector"], conv), jnp.asarray(images))
    # Box offsets and the sigmoid scores live on different scales: compare each on its own.
    _close(out[..., :4], ref[..., :4], **TOL[conv], what="box offsets")
    scores = np.asarray(ref[..., 4:])
    assert ((scores > 1e-3) & (scores < 1 - 1e-3)).mean() > 0.2  # the scores are informative
    _close(out[..., 4:], scores, **TOL[conv], what="objectness and class scores")


@pytest.mark.parametrize("conv", CONVS)
def test_rtmpose_matches_onnxruntime(exported, conv):
    cfg = exported["pose_cfg"]
    crops = np.random.default_rng(1).standard_normal((2, *cfg.input_size, 3)).astype(np.float32)
    ref_x, ref_y = run_onnx(exported["pose_onnx"], np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))
    out_x, out_y = _apply(_prepared(exported["pose_net"], conv), jnp.asarray(crops))
    assert out_x.shape == (2, cfg.num_keypoints, cfg.simcc_sizes[0])
    _close(out_x, ref_x, **TOL[conv], what="simcc_x")
    _close(out_y, ref_y, **TOL[conv], what="simcc_y")


@pytest.mark.parametrize("k,stride,hw", [(5, 1, (13, 10)), (3, 2, (13, 10)), (3, 2, (12, 9))])
def test_depthwise_conv_equals_grouped_convolution(k, stride, hw):
    # The tap-sum form stands in for XLA's grouped convolution (RTMPose's 5x5 blocks, and the
    # stride-2 downsampling of depthwise YOLOX sizes, which the tiny exports above do not cover).
    from anim_jax.pose.layers import depthwise_conv

    rng = np.random.default_rng(k + stride)
    x = rng.standard_normal((2, *hw, 6)).astype(np.float32)
    w = rng.standard_normal((k, k, 1, 6)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w).permute(3, 2, 0, 1),
                                     stride=stride, padding=k // 2, groups=6).permute(0, 2, 3, 1).numpy()
    _close(depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride), ref, rtol=1e-5, atol_frac=1e-6, what="depthwise")


@pytest.mark.parametrize("kernels", [(5, 9, 13), (3,), (13, 5, 9), (1, 7)])
def test_spp_pools_equal_torch_max_pools(kernels):
    # SPP's pools are separable and chained (a 5-pool of a 5-pool is a 9-pool); torch's
    # MaxPool2d(k, 1, k // 2) on each size alone is the reference. Maxima are exact: no tolerance.
    from anim_jax.pose.layers import spp_pools

    x = np.random.default_rng(len(kernels)).standard_normal((2, 11, 8, 3)).astype(np.float32)
    x[0, 4, 2:5] = 7.0  # ties
    x[1] -= 10.0  # all negative: the -inf padding must never win
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    for k, got in zip(kernels, spp_pools(jnp.asarray(x), kernels), strict=True):
        ref = torch.nn.functional.max_pool2d(xt, k, 1, k // 2).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"max pool {k} of {kernels}")
