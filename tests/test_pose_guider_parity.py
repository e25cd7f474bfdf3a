"""PoseGuider vs Moore-AnimateAnyone's own PoseGuider (arrays it produced, tests/data/README.md) and
vs a PyTorch PoseGuider written here from moore.md 1.6 (fp32, CPU, all parameters randomised,
conv_out included; it documents the layout and serves the key-map and export tests), config
inference and the ControlNet stage-1 init."""

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

import jax.numpy as jnp
import seeded
from anim_jax.convert.loader import expected_torch_shapes, load_torch_state_dict
from anim_jax.convert.mapping import CheckpointMismatchError, export_torch_state_dict, flat_params
from anim_jax.convert.pose_guider_keys import (
    POSE_GUIDER_KEYMAP,
    load_controlnet_cond_embedding,
    pose_guider_config_from_state_dict,
)
from anim_jax.models.pose_guider import PoseGuider
from tolerance import Tol, assert_close

VARIANTS = {"released": (16, 32, 96, 256), "default": (16, 32, 64, 128)}


class TorchPoseGuider(nn.Module):
    """Moore's PoseGuider on (N, 3, H, W): conv_in, 6 blocks (stride 1 / stride 2 pairs), conv_out;
    SiLU after every conv but conv_out."""

    def __init__(self, embedding_channels, block_out_channels):
        super().__init__()
        ch = block_out_channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(ch[:-1], ch[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(ch[-1], embedding_channels, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def torch_guider(channels, seed=0):
    model = TorchPoseGuider(320, channels).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # conv_out too: parity must not hide behind its zero init
            r = torch.randn(p.shape, generator=gen)
            p.copy_(0.2 * r if p.ndim == 1 else r / np.sqrt(p[0].numel()))
    return model


def state_dict_np(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# What our fp32 port reaches against the original on these configs, with a 10x margin (tolerance.py).
POSE_GUIDER_TOL = Tol(rtol=3e-6, atol=3e-6)


forward = nnx.jit(PoseGuider.__call__)


def ones_guider(channels) -> PoseGuider:
    """Traced abstractly, every parameter set to one: eager init compiles a kernel per parameter shape."""
    model = nnx.eval_shape(lambda: PoseGuider(320, channels, rngs=nnx.Rngs(0)))
    for var in flat_params(model).values():
        var.set_raw_value(jnp.ones(var.get_raw_value().shape))
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_image_and_video(variant):
    channels = VARIANTS[variant]
    tm = torch_guider(channels)
    model = load_torch_state_dict(ones_guider(channels), state_dict_np(tm), POSE_GUIDER_KEYMAP)

    rng = np.random.default_rng(0)
    video = rng.uniform(0, 1, (2, 3, 48, 40, 3)).astype(np.float32)  # (B, F, H, W, 3) in [0, 1]
    with torch.no_grad():
        ref = tm(torch.from_numpy(video.reshape(6, 48, 40, 3).transpose(0, 3, 1, 2).copy())).numpy()
    ref = ref.transpose(0, 2, 3, 1)
    out = forward(model, jnp.asarray(video))
    assert out.shape == (2, 3, 6, 5, 320)
    assert_close(out.reshape(6, 6, 5, 320), ref, POSE_GUIDER_TOL)


def test_matches_moore_pose_guider():
    """Moore's src/models/pose_guider.py, PoseGuider(32, block_out_channels=(4, 8, 12, 16)), its
    InflatedConv3d applied to (B, C, F, H, W), on seeded weights (tests/seeded.py, seed 1)."""
    model = nnx.eval_shape(lambda: PoseGuider(32, (4, 8, 12, 16), rngs=nnx.Rngs(0)))
    shapes = {k: s for k, (_, s) in expected_torch_shapes(model, POSE_GUIDER_KEYMAP).items()}
    model = load_torch_state_dict(model, seeded.state_dict(1, shapes), POSE_GUIDER_KEYMAP)
    video = np.random.default_rng(2).uniform(0, 1, (2, 3, 3, 32, 24)).astype(np.float32)  # (B, C, F, H, W)
    want = np.load(pathlib.Path(__file__).parent / "data" / "moore_pose_guider.npz")["output"]
    out = forward(model, jnp.asarray(video.transpose(0, 2, 3, 4, 1)))
    assert np.abs(want).max() > 0.1  # conv_out is seeded too: a real output, not Moore's zero init
    assert_close(out, want.transpose(0, 2, 3, 4, 1), POSE_GUIDER_TOL)


def test_fresh_conv_out_is_zero():
    model = PoseGuider(320, VARIANTS["default"], rngs=nnx.Rngs(0))  # shapes shared with the round trip
    assert not np.any(model.conv_out.kernel[...]) and not np.any(model.conv_out.bias[...])
    assert np.any(model.blocks[5].kernel[...])
    np.testing.assert_array_equal(model(jnp.ones((1, 16, 16, 3))), np.zeros((1, 2, 2, 320)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_from_state_dict(variant):
    sd = state_dict_np(torch_guider(VARIANTS[variant]))
    assert pose_guider_config_from_state_dict(sd) == (320, VARIANTS[variant])
    assert pose_guider_config_from_state_dict({k: v.shape for k, v in sd.items()}) == (320, VARIANTS[variant])
    with pytest.raises(CheckpointMismatchError, match="conv_out.weight"):
        pose_guider_config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("conv_out")})


def test_controlnet_stage1_init():
    """ControlNet's controlnet_cond_embedding.* is copied in, conv_out stays zero, other keys ignored."""
    channels = VARIANTS["released"]
    sd = state_dict_np(torch_guider(channels, seed=4))
    controlnet = {f"controlnet_cond_embedding.{k}": v for k, v in sd.items()}
    controlnet["controlnet_down_blocks.0.weight"] = np.ones((320, 320, 1, 1), np.float32)
    controlnet["conv_in.weight"] = np.ones((320, 4, 3, 3), np.float32)
    model = ones_guider(channels)  # conv_out must be reset to zero
    load_controlnet_cond_embedding(model, controlnet)
    exported = export_torch_state_dict(model, POSE_GUIDER_KEYMAP)
    for k, v in sd.items():
        if k.startswith("conv_out."):
            assert not np.any(exported[k])
        else:
            np.testing.assert_array_equal(exported[k], v)

    del controlnet["controlnet_cond_embedding.blocks.3.bias"]
    controlnet["controlnet_cond_embedding.blocks.1.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_controlnet_cond_embedding(model, controlnet)
    assert "blocks.3.bias" in str(e.value) and "blocks.1.weight: checkpoint (16, 16, 3, 3)" in str(e.value)


def test_strict_loading_errors():
    sd = state_dict_np(torch_guider(VARIANTS["released"]))
    del sd["blocks.2.weight"]
    sd["blocks.6.weight"] = np.zeros((96, 96, 3, 3), np.float32)
    sd["conv_out.weight"] = np.zeros((320, 128, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_torch_state_dict(ones_guider(VARIANTS["released"]), sd, POSE_GUIDER_KEYMAP)
    msg = str(e.value)
    assert "blocks.2.weight" in msg and "blocks.6.weight" in msg
    assert "conv_out.weight: checkpoint (320, 128, 3, 3), model expects (320, 256, 3, 3)" in msg


def test_export_round_trip():
    channels = VARIANTS["default"]
    model = PoseGuider(320, channels, rngs=nnx.Rngs(2))
    model.conv_out.kernel[...] = jnp.full(model.conv_out.kernel.shape, 0.5)
    exported = export_torch_state_dict(model, POSE_GUIDER_KEYMAP)
    fresh = load_torch_state_dict(PoseGuider(320, channels, rngs=nnx.Rngs(3)), exported, POSE_GUIDER_KEYMAP)
    fa, fb = flat_params(model), flat_params(fresh)
    for k in fa:
        np.testing.assert_array_equal(fa[k][...], fb[k][...])
    tm = torch_guider(channels)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
    x = np.random.default_rng(1).uniform(0, 1, (1, 24, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    assert_close(forward(model, jnp.asarray(x)), ref, POSE_GUIDER_TOL)
