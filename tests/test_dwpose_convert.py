"""``anim-jax convert-pose``: full-size structures, bad inputs, and the converted directory.

The full-size networks (DWPose's YOLOX-L and RTMPose-L, and other sizes) are checked without
exporting them (an export of YOLOX-L takes tens of seconds): the PyTorch stand-ins run once on the
meta device (shapes only) with hooks recording each conv / linear / learned elementwise parameter in call order,
as the TorchScript exporter writes them into the graph (the tiny exports in
``test_pose_nets_parity.py`` show the converter reads those graphs in that order). From that record
the converter must infer the configuration and fill every parameter of the abstract JAX model.
"""

from __future__ import annotations

import functools
import json
import types

import numpy as np
import pytest
import torch
from dwpose_torch import DET_HW, GAU, ScaleNorm, TorchRTMPose, TorchYOLOX, export_onnx, randomize_, tiny_exports
from flax import nnx

from anim_jax.cli import main as cli_main
from anim_jax.convert import dwpose, store
from anim_jax.convert.onnx_graph import OnnxGraph, OnnxGraphMismatchError, ParamOp
from anim_jax.pose.networks import load_dwpose
from anim_jax.pose.rtmpose import RTMPose, RTMPoseConfig
from anim_jax.pose.yolox import YOLOX, YOLOXConfig


# ------------------------------------------------------------------------------------------------
# Full-size structures


def _recorded_graph(model: torch.nn.Module, input_shape, *, dynamic_input: bool = False) -> OnnxGraph:
    """What the converter would read from ``model``'s export, shapes only (zero-stride arrays)."""
    ops: list[ParamOp] = []

    def zeros(shape):
        return np.broadcast_to(np.float32(0), tuple(shape))

    def add(kind, name, weight, **kw):
        ops.append(ParamOp(kind, name, len(ops), weight, **kw))

    def on_conv(mod, name):
        def hook(m, args, out):
            p = m.padding[0]
            add("conv", name, zeros(m.weight.shape), bias=zeros((m.out_channels,)), stride=tuple(m.stride),
                pads=(p, p, p, p), groups=m.groups, dilations=tuple(m.dilation))
        return hook

    def on_linear(mod, name):
        def hook(m, args, out):
            add("linear", name, zeros(m.weight.shape[::-1]))
            if name.endswith("gau.o"):  # the residual scale is applied right after o
                add("mul", "res_scale", zeros(model.gau.res_scale.shape))
        return hook

    def on_scale_norm(mod, name):
        def hook(m, args, out):
            add("mul", f"{name} 1/sqrt(d)", zeros(()))  # a constant: must not be taken for g
            add("mul", f"{name}.g", zeros((1,)))
        return hook

    def on_gau_act(m, args, out):  # gamma and beta act on the SiLU output
        add("mul", "gamma", zeros((1, 1) + tuple(model.gau.gamma.shape)))
        add("add", "beta", zeros(model.gau.beta.shape))

    pools = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(on_conv(m, name))
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(on_linear(m, name))
        elif isinstance(m, ScaleNorm):
            m.register_forward_hook(on_scale_norm(m, name))
        elif isinstance(m, GAU):
            m.act.register_forward_hook(on_gau_act)
        elif isinstance(m, torch.nn.MaxPool2d):
            pools.append(m.kernel_size)
    with torch.no_grad():  # on the meta device: shapes only, nothing computed
        model(torch.zeros(input_shape, device="meta"))
    shape = (None, 3, None, None) if dynamic_input else tuple(input_shape)
    return OnnxGraph("recorded", ops, {"input": shape}, tuple(pools), len(ops))


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg).eval()


@functools.lru_cache(maxsize=None)
def _recorded(kind: str, name: str, dynamic_input: bool = False) -> OnnxGraph:
    if kind == "yolox":
        return _recorded_graph(_meta(TorchYOLOX, YOLOX_SIZES[name]), (1, 3, 640, 640))
    cfg = RTMPOSE_SIZES[name]
    return _recorded_graph(_meta(TorchRTMPose, cfg), (1, 3, *cfg.input_size), dynamic_input=dynamic_input)


def _fills_abstract_model(model_cls, cfg, arrays):
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    dwpose._check_against_model(model, arrays, "recorded")  # raises on any missing/unexpected/misshaped


YOLOX_SIZES = {
    "yolox-l (DWPose)": YOLOXConfig.yolox_l(),
    "yolox-nano (depthwise)": YOLOXConfig(base_channels=16, depths=(1, 3, 3, 1), fpn_depth=1, head_channels=64,
                                          depthwise=True),
}
RTMPOSE_SIZES = {
    "rtmpose-l wholebody 384 (DWPose)": RTMPoseConfig.dwpose_l_384(),
    "rtmpose-m body 256x192": RTMPoseConfig(stem_channels=(24, 24, 48), stage_channels=(96, 192, 384, 768),
                                            stage_blocks=(2, 4, 4, 2), num_keypoints=17, input_size=(256, 192)),
}


@pytest.mark.parametrize("name", list(YOLOX_SIZES))
def test_full_size_yolox_structure_converts(name):
    cfg = YOLOX_SIZES[name]
    graph = _recorded("yolox", name)
    assert dwpose.infer_yolox_config(graph) == cfg
    _fills_abstract_model(YOLOX, cfg, dwpose.match_slots(graph, dwpose.yolox_slots(cfg)))


@pytest.mark.parametrize("name,dynamic_input", [(n, False) for n in RTMPOSE_SIZES] + [(next(iter(RTMPOSE_SIZES)), True)])
def test_full_size_rtmpose_structure_converts(name, dynamic_input):
    cfg = RTMPOSE_SIZES[name]
    graph = _recorded("rtmpose", name, dynamic_input)
    assert dwpose.infer_rtmpose_config(graph) == cfg  # crop size and SimCC ratio from the bins if not static
    arrays = dwpose.match_slots(graph, dwpose.rtmpose_slots(cfg))
    _fills_abstract_model(RTMPose, cfg, arrays)


def test_dwpose_full_sizes_have_the_published_parameter_counts():
    # YOLOX-L: 54.2 M parameters (Megvii's model zoo table); RTMPose-L's head maps 1024 channels to
    # 133 keypoints with a 7x7 conv (6.67 M) and 256 -> 576 / 768 SimCC classifiers.
    for model_cls, cfg, expected in ((YOLOX, YOLOXConfig.yolox_l(), 54.2e6), (RTMPose, RTMPoseConfig(), None)):
        model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
        n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        meta = _meta(TorchYOLOX if model_cls is YOLOX else TorchRTMPose, cfg)
        bn = sum(m.num_features for m in meta.modules() if isinstance(m, torch.nn.BatchNorm2d))
        torch_params = sum(p.numel() for p in meta.parameters())
        # Folding moves each BatchNorm's scale into the conv and leaves one bias per channel.
        assert n == torch_params - bn
        if expected:
            assert abs(n - expected) < 0.05e6, n


# ------------------------------------------------------------------------------------------------
# Converting files; bad inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    det, pose = tiny_exports(True)
    (d / "det.onnx").write_bytes(det)
    (d / "pose.onnx").write_bytes(pose)
    return d


def test_convert_pose_cli_writes_a_loadable_directory(files, tmp_path, capsys):
    out = tmp_path / "weights" / "dwpose"
    assert cli_main(["convert-pose", "--detector", str(files / "det.onnx"), "--pose", str(files / "pose.onnx"),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 keypoints" in printed and "written to" in printed
    assert sorted(p.name for p in out.iterdir()) == ["anim_jax.json", "detector.safetensors", "pose.safetensors"]
    detector, pose_net = load_dwpose(out)
    assert detector.config == YOLOXConfig.tiny() and pose_net.config == RTMPoseConfig.tiny()
    assert json.loads((out / "anim_jax.json").read_text())["conversion"]["sources"]["pose"].endswith("pose.onnx")

    # An existing directory is kept unless --overwrite; then it is replaced whole.
    before = (out / "detector.safetensors").read_bytes()
    assert cli_main(["convert-pose", "--detector", str(files / "det.onnx"), "--pose", str(files / "pose.onnx"),
                     "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert-pose", "--detector", str(files / "det.onnx"), "--pose", str(files / "pose.onnx"),
                     "--out", str(out), "--overwrite"]) == 0
    assert (out / "detector.safetensors").read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["dwpose"]  # no temporary directory left behind


def test_dry_run_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "dwpose"
    assert cli_main(["convert-pose", "--detector", str(files / "det.onnx"), "--pose", str(files / "pose.onnx"),
                     "--out", str(out), "--dry-run"]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "not-onnx", "swapped"])
def test_bad_input_files_give_one_line_naming_the_file(case, files, tmp_path, capsys):
    det, pose = files / "det.onnx", files / "pose.onnx"
    if case == "missing":
        det = tmp_path / "nowhere.onnx"
        expected = "does not exist"
    elif case == "not-onnx":
        det = tmp_path / "yolox_l.onnx"
        det.write_bytes(b"<html>404 Not Found</html>" * 10)
        expected = "not a readable ONNX model"
    else:
        det, pose = pose, det
        expected = "is not a YOLOX detector: its first Conv should be the Focus stem"
    out = tmp_path / "out"
    assert cli_main(["convert-pose", "--detector", str(det), "--pose", str(pose), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("anim-jax convert-pose: error: "), err
    assert str(det) in err and expected in err, err
    assert not out.exists()


def test_a_layer_that_does_not_fit_is_named(tmp_path):
    # A YOLOX whose box branch predicts 5 numbers: sizes infer fine, the reg_pred convs do not fit.
    cfg = YOLOXConfig.tiny()
    model = TorchYOLOX(cfg)
    model.reg_preds = torch.nn.ModuleList([torch.nn.Conv2d(cfg.head_channels, 5, 1) for _ in range(3)])
    (tmp_path / "det.onnx").write_bytes(export_onnx(randomize_(model, 0), torch.zeros(1, 3, *DET_HW), ["output"]))
    with pytest.raises(OnnxGraphMismatchError) as e:
        dwpose.read_detector(tmp_path / "det.onnx")
    msg = str(e.value)
    assert "the first node that does not fit is node #" in msg and "Conv" in msg
    assert "3 misfit" in msg and "expected head.levels.0.reg_pred (Conv 4x8x1x1)" in msg
    assert "found Conv 5x8x1x1" in msg


def test_branches_emitted_in_another_order_are_caught(tmp_path):
    # A CSP layer whose two same-shaped 1x1 branches reach the graph in the other order: the shapes
    # all fit in sequence, so only the data flow shows that the weights would be swapped.
    model = randomize_(TorchYOLOX(YOLOXConfig.tiny()), 0)

    def conv2_first(self, x):
        x2 = self.conv2(x)
        x1 = self.conv1(x)
        return self.conv3(torch.cat((self.m(x1), x2), 1))

    model.dark3[1].forward = types.MethodType(conv2_first, model.dark3[1])
    (tmp_path / "det.onnx").write_bytes(export_onnx(model, torch.zeros(1, 3, *DET_HW), ["output"]))
    with pytest.raises(OnnxGraphMismatchError) as e:
        dwpose.read_detector(tmp_path / "det.onnx")
    msg = str(e.value)
    assert "matched to backbone.dark3.csp.m.0.conv1, which reads ['backbone.dark3.csp.conv1'], but the node reads " \
           "['backbone.dark3.csp.conv2']" in msg, msg
    assert "another order" in msg


def test_load_dwpose_rejects_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="anim_jax.json is missing"):
        load_dwpose(tmp_path)
    store.write_config(tmp_path, {"lpips": {"net": "vgg"}})
    with pytest.raises(ValueError, match="not a DWPose conversion"):
        load_dwpose(tmp_path)

