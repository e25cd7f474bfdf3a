"""AnimateDiff motion module: parity with diffusers' AnimateDiffTransformer3D, key maps for the
original and diffusers formats, position-encoding checks and config parsing.

diffusers pools the module's GroupNorm statistics over frames; the original (and Moore) normalise
each frame on its own. The parity tests run diffusers with its GroupNorm applied per frame (same
weights, same keys) and a separate test pins down that this is the only difference.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter
from flax import nnx

from anim_jax.convert.loader import load_torch_state_dict
from anim_jax.convert.mapping import export_torch_state_dict, prefixed
from anim_jax.convert.model_configs import motion_config_from_moore_yaml, motion_config_from_state_dict_shapes
from anim_jax.convert.motion_keys import (
    MOTION_KEYMAP_DIFFUSERS,
    MOTION_KEYMAP_ORIGINAL,
    diffusers_to_original_keys,
    motion_module_channels,
    motion_module_prefixes,
    original_to_diffusers_keys,
)
from anim_jax.models.attention_ops import AttentionConfig
from anim_jax.models.motion import MotionConfig, MotionModule, check_pe_buffers, sinusoidal_position_table
from tolerance import Tol, assert_close

CASES = {
    "c32-h2-f8": dict(channels=32, heads=2, groups=8, max_len=32, frames=8, hw=(3, 5), batch=2,
                      prefix="down_blocks.0.motion_modules.0"),
    "c64-h8-f5": dict(channels=64, heads=8, groups=32, max_len=24, frames=5, hw=(3, 3), batch=1,
                      prefix="up_blocks.0.motion_modules.2"),
}  # fmt: skip
PREFIXES = [
    "down_blocks.0.motion_modules.0", "down_blocks.0.motion_modules.1", "mid_block.motion_modules.0",
    "up_blocks.0.motion_modules.0", "up_blocks.0.motion_modules.1", "up_blocks.0.motion_modules.2",
]  # fmt: skip


@functools.cache
def _adapter(channels, heads, groups, max_len):
    """A one-level diffusers MotionAdapter with every parameter randomised (proj_out included)."""
    torch.manual_seed(channels)
    adapter = MotionAdapter(
        block_out_channels=(channels,),
        motion_num_attention_heads=heads,
        motion_norm_num_groups=groups,
        motion_max_seq_length=max_len,
        use_motion_mid_block=True,
    ).eval()
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return adapter


def _case(name):
    c = CASES[name]
    adapter = _adapter(c["channels"], c["heads"], c["groups"], c["max_len"])
    cfg = MotionConfig(num_attention_heads=c["heads"], norm_num_groups=c["groups"], temporal_position_encoding_max_len=c["max_len"])
    sd = {k: v.detach().numpy().copy() for k, v in adapter.state_dict().items()}
    return c, adapter, cfg, sd


class _PerFrameGroupNorm(torch.nn.GroupNorm):
    """The original's norm: frames folded into the batch, so statistics are per frame."""

    def forward(self, x):  # (B, C, F, H, W), as AnimateDiffTransformer3D calls it
        b, c, f, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).transpose(1, 2)


def _torch_forward(module, x, *, per_frame=True):
    """x: (B, F, H, W, C) numpy -> diffusers module output in the same layout."""
    b, f, h, w, c = x.shape
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3).reshape(b * f, c, h, w)))
    saved = module.norm.__class__
    if per_frame:
        module.norm.__class__ = _PerFrameGroupNorm
    try:
        with torch.no_grad():
            y = module(xt, num_frames=f).numpy()
    finally:
        module.norm.__class__ = saved
    return y.reshape(b, f, c, h, w).transpose(0, 1, 3, 4, 2)


def _input(c, frames=None):
    rng = np.random.default_rng(c["channels"])
    shape = (c["batch"], frames or c["frames"], *c["hw"], c["channels"])
    return (1.5 * rng.standard_normal(shape) + 0.5).astype(np.float32)


_forward = nnx.jit(lambda m, v: m(v))  # one function, so models of one structure share the compile


def _run(model, x):
    return np.asarray(_forward(model, x))


# What our fp32 motion module reaches against diffusers', with a 10x margin (tolerance.py).
MOTION_TOL = Tol(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers_in_both_formats(name):
    c, adapter, cfg, sd = _case(name)
    prefix = c["prefix"]

    diff_sd = prefixed(sd, prefix)
    assert len(diff_sd) == 27 and check_pe_buffers(diff_sd, cfg) == 1
    model_d = load_torch_state_dict(MotionModule(c["channels"], cfg, rngs=nnx.Rngs(1)), diff_sd, MOTION_KEYMAP_DIFFUSERS)

    orig_sd = prefixed(diffusers_to_original_keys(sd), prefix)
    assert len(orig_sd) == 28 and check_pe_buffers(orig_sd, cfg) == 2
    model_o = load_torch_state_dict(MotionModule(c["channels"], cfg, rngs=nnx.Rngs(2)), orig_sd, MOTION_KEYMAP_ORIGINAL)

    x = _input(c)
    want = _torch_forward(adapter.get_submodule(prefix), x)
    got = _run(model_d, x)
    assert_close(got, want, MOTION_TOL)
    np.testing.assert_array_equal(_run(model_o, x), got)

    # The chunked attention path computes the same thing, and so does the per-position path run over
    # chunks of 3 positions (the feed-forward's 8x-wide rows of every frame set the chunk).
    frames, channels = x.shape[1], x.shape[-1]
    chunked = AttentionConfig("chunked", query_chunk_size=3, row_chunk_elements=8 * frames * channels * 3)
    model_c = MotionModule(c["channels"], cfg, attention=chunked, rngs=nnx.Rngs(3))
    assert_close(_run(load_torch_state_dict(model_c, diff_sd, MOTION_KEYMAP_DIFFUSERS), x), want, MOTION_TOL)

    # Export reproduces the original-format tensors bit for bit (the pe buffers are not parameters).
    exported = export_torch_state_dict(model_o, MOTION_KEYMAP_ORIGINAL)
    assert set(exported) == {k for k in orig_sd if not k.endswith(".pe")}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, orig_sd[k], err_msg=k)


def test_diffusers_groupnorm_pools_frames():
    """Unpatched diffusers differs from the original exactly by frame-pooled GroupNorm statistics."""
    c, adapter, cfg, sd = _case("c32-h2-f8")
    module = adapter.get_submodule(c["prefix"])
    model = load_torch_state_dict(MotionModule(32, cfg, rngs=nnx.Rngs(0)), prefixed(sd, c["prefix"]), MOTION_KEYMAP_DIFFUSERS)
    x = _input(c)
    x[:, 1::2] *= 3.0  # frames with different statistics
    ours, pooled = _run(model, x), _torch_forward(module, x, per_frame=False)
    assert np.max(np.abs(ours - pooled)) > 1e-2 * np.max(np.abs(pooled))
    x1 = x[:, :1]
    assert_close(_run(model, x1), _torch_forward(module, x1, per_frame=False), MOTION_TOL)


def test_zero_initialised_module_is_identity():
    model = MotionModule(32, MotionConfig(num_attention_heads=4, norm_num_groups=8), rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(model.temporal_transformer.proj_out.kernel[...]))
    x = _input(CASES["c32-h2-f8"])
    np.testing.assert_array_equal(_run(model, x), x)


def test_window_longer_than_position_encoding_is_an_error():
    c, _, cfg, _ = _case("c64-h8-f5")
    model = MotionModule(64, cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"25 frames.*temporal_position_encoding_max_len=24"):
        _run(model, _input(c, frames=25))


def test_pe_buffers_checked():
    c, _, cfg, sd = _case("c32-h2-f8")
    orig = diffusers_to_original_keys(sd)
    assert check_pe_buffers(sd, cfg) == 6 and check_pe_buffers(orig, cfg) == 12
    pe = sd["mid_block.motion_modules.0.transformer_blocks.0.pos_embed.pe"]
    np.testing.assert_allclose(pe[0], sinusoidal_position_table(32, 32), atol=1e-6)

    key = "up_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    bad = dict(orig)
    bad[key] = orig[key].copy()
    bad[key][0, 3, 5] += 1e-3
    with pytest.raises(ValueError, match=r"attention_blocks\.1\.pos_encoder\.pe: differs from the sinusoidal"):
        check_pe_buffers(bad, cfg)
    with pytest.raises(ValueError, match=r"pos_encoder\.pe differs from"):
        original_to_diffusers_keys(bad)  # the two copies of one block disagree
    with pytest.raises(ValueError, match=r"pos_embed\.pe: position encoding of length 32, config temporal_position_encoding_max_len=24"):
        check_pe_buffers(sd, MotionConfig(temporal_position_encoding_max_len=24))


def test_whole_adapter_keys_and_inferred_config():
    c, _, cfg, sd = _case("c32-h2-f8")
    orig = diffusers_to_original_keys(sd)
    assert len(sd) == 6 * 27 and len(orig) == 6 * 28
    back = original_to_diffusers_keys(orig)
    assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)
    assert diffusers_to_original_keys(orig).keys() == orig.keys()  # original keys pass through

    for d in (sd, orig):
        shapes = {k: v.shape for k, v in d.items()}
        assert motion_module_prefixes(shapes) == PREFIXES
        assert motion_module_channels(shapes) == {p: 32 for p in PREFIXES}
        inferred = motion_config_from_state_dict_shapes(shapes, num_attention_heads=2, norm_num_groups=8)
        assert inferred == dataclasses.replace(cfg, levels=(0,))

    # The v1 layout: no mid block, max_len 24, inferred from a checkpoint without a mid block.
    shapes = {k: v.shape for k, v in orig.items() if not k.startswith("mid_block.")}
    shapes = {k: (1, 24, 32) if k.endswith(".pe") else s for k, s in shapes.items()}
    v1 = motion_config_from_state_dict_shapes(shapes)
    assert (v1.use_mid_block, v1.temporal_position_encoding_max_len, v1.num_transformer_block, v1.num_attention_blocks) == (False, 24, 1, 2)


def test_config_from_moore_yaml():
    moore_v2 = {
        "use_inflated_groupnorm": True, "unet_use_cross_frame_attention": False, "unet_use_temporal_attention": False,
        "use_motion_module": True, "motion_module_resolutions": [1, 2, 4, 8], "motion_module_mid_block": True,
        "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
        "motion_module_kwargs": {
            "num_attention_heads": 8, "num_transformer_block": 1,
            "attention_block_types": ["Temporal_Self", "Temporal_Self"], "temporal_position_encoding": True,
            "temporal_position_encoding_max_len": 32, "temporal_attention_dim_div": 1,
        },
    }  # fmt: skip
    assert motion_config_from_moore_yaml(moore_v2) == MotionConfig()
    assert motion_config_from_moore_yaml(moore_v2["motion_module_kwargs"]) == MotionConfig()
    v1 = motion_config_from_moore_yaml(
        {**moore_v2, "motion_module_mid_block": False,
         "motion_module_kwargs": {**moore_v2["motion_module_kwargs"], "temporal_position_encoding_max_len": 24}}
    )  # fmt: skip
    assert (v1.use_mid_block, v1.temporal_position_encoding_max_len, v1.levels) == (False, 24, (0, 1, 2, 3))

    inner = moore_v2["motion_module_kwargs"]
    for bad, match in (
        ({"attention_block_types": ["Temporal_Self", "Temporal_Cross"]}, "attention_block_types"),
        ({"cross_frame_attention_mode": "Spatial"}, "cross_frame_attention_mode"),
        ({"temporal_attention_dim_div": 2}, "temporal_attention_dim_div"),
        ({"some_new_option": 1}, "some_new_option"),
    ):
        with pytest.raises(ValueError, match=match):
            motion_config_from_moore_yaml({**inner, **bad})
    with pytest.raises(ValueError, match="decoder_only"):
        motion_config_from_moore_yaml({**moore_v2, "motion_module_decoder_only": True})
    with pytest.raises(ValueError, match="motion_module_type"):
        motion_config_from_moore_yaml({**moore_v2, "motion_module_type": "Conv"})
