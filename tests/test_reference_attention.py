"""Reference attention against Moore-AnimateAnyone's own ReferenceAttentionControl (arrays it produced,
tests/data/README.md), and reference attention and frame-pooled GroupNorm against PyTorch
computations written here.

The PyTorch side is diffusers' UNet2DConditionModel with every BasicTransformerBlock's forward
replaced by Moore-AnimateAnyone's read-mode ``hacked_basic_transformer_inner_forward``: attn1's
keys/values are ``cat([norm1(h), ref repeated per frame])``, the bank optionally stored in fp16.
The bank comes from a second diffusers UNet through forward pre-hooks on attn1 (the writer), paired
by module path, which is Moore's width-sorted pairing.
"""

from __future__ import annotations

import contextlib
import pathlib
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import seeded
from anim_jax.convert.loader import expected_torch_shapes
from anim_jax.convert.model_configs import unet_config_from_diffusers
from anim_jax.convert.unet_keys import UNET_KEYMAP
from test_unet_parity import (
    TINY_2L,
    UNET_TOL,
    _abstract_unet,
    capture_attn1_inputs,
    inputs,
    jax_unet,
    state_dict_numpy,
    torch_forward,
    torch_unet,
)
from tolerance import Tol, assert_close

CONFIG = TINY_2L
BATCH, FRAMES, HW = 2, 2, (8, 8)  # the denoiser shapes of test_unet_parity's 2-level case
# The denoiser given a reference bank reaches ~3e-6 (Moore's own code) and ~1.5e-6 (the
# transcription): 10x margin, tight enough that an unrounded or bfloat16 bank falls outside it
# (test_mutations.py).
REFERENCE_TOL = Tol(rtol=3e-5, atol=3e-5)


def moore_read_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
    """Moore's hacked BasicTransformerBlock forward in read mode (no CFG mask, no temporal attn)."""
    norm_hidden_states = self.norm1(hidden_states)
    if self.bank is None:
        kv = norm_hidden_states
    else:
        ref = self.bank.to(torch.float16) if self.bank_fp16 else self.bank
        ref = ref.unsqueeze(1).repeat(1, self.video_length, 1, 1).flatten(0, 1)  # b t l c -> (b t) l c
        kv = torch.cat([norm_hidden_states, ref], dim=1)
    hidden_states = self.attn1(norm_hidden_states, encoder_hidden_states=kv) + hidden_states
    hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states) + hidden_states
    return self.ff(self.norm3(hidden_states)) + hidden_states


@contextlib.contextmanager
def moore_reader(unet, bank: dict[str, np.ndarray], video_length: int, fp16: bool):
    blocks = {n: m for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"}
    assert set(blocks) == set(bank)
    for name, block in blocks.items():
        block.bank, block.bank_fp16, block.video_length = torch.from_numpy(bank[name]), fp16, video_length
        block.forward = types.MethodType(moore_read_forward, block)
    try:
        yield
    finally:
        for block in blocks.values():
            del block.forward, block.bank, block.bank_fp16, block.video_length


class FramePooledGroupNorm(torch.nn.Module):
    """The original UNet3D's non-inflated GroupNorm: nn.GroupNorm on the 5-D (B, C, F, H, W) tensor."""

    def __init__(self, norm: torch.nn.GroupNorm, frames: int):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x):
        n, c, h, w = x.shape
        x5 = x.reshape(n // self.frames, self.frames, c, h, w).permute(0, 2, 1, 3, 4)
        return self.norm(x5).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


@contextlib.contextmanager
def pooled_groupnorms(unet, frames: int):
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    saved = [(r, r.norm1, r.norm2) for r in resnets] + [(unet, unet.conv_norm_out, None)]
    for r in resnets:
        r.norm1, r.norm2 = FramePooledGroupNorm(r.norm1, frames), FramePooledGroupNorm(r.norm2, frames)
    unet.conv_norm_out = FramePooledGroupNorm(unet.conv_norm_out, frames)
    try:
        yield
    finally:
        for module, a, b in saved:
            if b is None:
                module.conv_norm_out = a
            else:
                module.norm1, module.norm2 = a, b


@pytest.fixture(scope="module")
def setup():
    torch_ref, torch_den = torch_unet(CONFIG, seed=11), torch_unet(CONFIG, seed=12)
    ref_x, _, ref_ctx = inputs(CONFIG, BATCH, 1, HW, seed=7)
    ref_t = np.zeros((BATCH,), np.float32)  # ReferenceNet runs at t = 0
    names, bank = capture_attn1_inputs(torch_ref, ref_x, ref_t, ref_ctx)
    x, t, ctx = inputs(CONFIG, BATCH, FRAMES, HW)
    return types.SimpleNamespace(
        torch_ref=torch_ref, torch_den=torch_den, den_sd=state_dict_numpy(torch_den),
        ref_inputs=(jnp.asarray(ref_x), jnp.asarray(ref_t), jnp.asarray(ref_ctx)),
        names=names, bank=bank, bank_by_name=dict(zip(names, bank)),
        x=x, t=t, ctx=ctx, args=(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)),
    )


def by_path(den, bank) -> dict:
    """Reference tokens in module order keyed by the denoiser's block paths (the order both share)."""
    return dict(zip(den.named_transformer_blocks(), (jnp.asarray(b) for b in bank)))


def torch_denoise(s, *, bank=None, fp16=False):
    if bank is None:
        return torch_forward(s.torch_den, s.x, s.t, s.ctx, FRAMES)
    with moore_reader(s.torch_den, bank, FRAMES, fp16):
        return torch_forward(s.torch_den, s.x, s.t, s.ctx, FRAMES)


def test_matches_moore_reference_attention_control():
    """Moore's writer (UNet2DConditionModel, mode "write") and reader (UNet3DConditionModel with
    inflated GroupNorm, no motion modules, mode "read"), fusion_blocks "full", its default float16
    bank copy, pose features added after conv_in; both UNets seeded (tests/seeded.py, 11 and 12)."""
    abstract = nnx.merge(*_abstract_unet(unet_config_from_diffusers(CONFIG), False))
    shapes = {k: s for k, (_, s) in expected_torch_shapes(abstract, UNET_KEYMAP).items()}
    ref_net = jax_unet(CONFIG, seeded.state_dict(11, shapes), reference_net=True)
    den = jax_unet(CONFIG, seeded.state_dict(12, shapes), reference_fp16_rounding=True)
    rng = np.random.default_rng(21)  # the generator's draws, in its order
    ref_latent = rng.standard_normal((BATCH, 4, *HW)).astype(np.float32)
    ctx = rng.standard_normal((BATCH, 1, 16)).astype(np.float32)
    noisy = rng.standard_normal((BATCH, 4, FRAMES, *HW)).astype(np.float32)
    t = np.array([37, 912], np.float32)
    pose = (0.5 * rng.standard_normal((BATCH, 32, FRAMES, *HW))).astype(np.float32)
    frames_last = lambda v: jnp.asarray(v.transpose(0, 2, 3, 4, 1).reshape(-1, *HW, v.shape[1]))  # noqa: E731

    feats = ref_net(jnp.asarray(ref_latent.transpose(0, 2, 3, 1)), jnp.zeros((BATCH,)), jnp.asarray(ctx))
    out = den(frames_last(noisy), jnp.asarray(t), jnp.asarray(ctx), num_frames=FRAMES, reference=den.reference_kv(feats),
              pose_features=frames_last(pose))
    want = np.load(pathlib.Path(__file__).parent / "data" / "moore_reference_attention.npz")["output"]
    assert_close(out, np.asarray(frames_last(want)), REFERENCE_TOL)


def test_reference_net_into_denoiser_matches_moore(setup):
    s = setup
    ref_net = jax_unet(CONFIG, state_dict_numpy(s.torch_ref), reference_net=True)
    feats = ref_net(*s.ref_inputs)
    for ours, ref in zip(feats.values(), s.bank):
        assert_close(ours, ref, UNET_TOL)
    den = jax_unet(CONFIG, s.den_sd, reference_fp16_rounding=False)
    out = den(*s.args, num_frames=FRAMES, reference=den.reference_kv(feats))
    assert_close(out, torch_denoise(s, bank=s.bank_by_name, fp16=False), UNET_TOL)


@pytest.mark.parametrize("fp16", [False, True])
def test_fp16_rounding_of_the_reference(setup, fp16):
    s = setup
    den = jax_unet(CONFIG, s.den_sd, reference_fp16_rounding=fp16)
    out = den(*s.args, num_frames=FRAMES, reference=den.reference_kv(by_path(den, s.bank)))
    ref = torch_denoise(s, bank=s.bank_by_name, fp16=fp16)
    other = torch_denoise(s, bank=s.bank_by_name, fp16=not fp16)
    # The rounding is visible at this size, and we match the right side of it tightly.
    assert np.abs(ref - other).max() > 10 * np.abs(np.asarray(out) - ref).max()
    assert_close(out, ref, REFERENCE_TOL)


def test_no_reference_is_plain_self_attention(setup):
    s = setup
    den = jax_unet(CONFIG, s.den_sd)
    out = den(*s.args, num_frames=FRAMES)
    assert_close(out, torch_denoise(s), UNET_TOL)
    # Entries may also be None per block.
    out_none = den(*s.args, num_frames=FRAMES, reference={p: None for p in den.named_transformer_blocks()})
    np.testing.assert_array_equal(np.asarray(out_none), np.asarray(out))


def test_reference_kv_is_each_blocks_projection_of_the_rounded_tokens(setup):
    s = setup
    den = jax_unet(CONFIG, s.den_sd)  # with fp16 rounding: reference_kv applies it
    tokens = by_path(den, s.bank)
    kv = den.reference_kv(tokens)
    assert list(kv) == list(tokens)
    assert all(e.k.shape == (BATCH, b.shape[1], 2, b.shape[2] // 2) for e, b in zip(kv.values(), s.bank))
    for path, block in den.named_transformer_blocks().items():
        want = block.attn1.project_kv(tokens[path].astype(jnp.float16).astype(jnp.float32))
        np.testing.assert_array_equal(np.asarray(kv[path].k), np.asarray(want.k))
        np.testing.assert_array_equal(np.asarray(kv[path].v), np.asarray(want.v))
    # The denoiser takes only the projected form.
    with pytest.raises(TypeError, match="projected keys/values"):
        den(*s.args, num_frames=FRAMES, reference=tokens)


def test_one_reference_and_context_shared_by_all_videos(setup):
    s = setup
    den = jax_unet(CONFIG, s.den_sd)
    one = by_path(den, [b[:1] for b in s.bank])
    x, t, ctx = s.args
    a = den(x, t, ctx[:1], num_frames=FRAMES, reference=den.reference_kv(one))
    b = den(x, t, jnp.repeat(ctx[:1], BATCH, axis=0), num_frames=FRAMES,
            reference=den.reference_kv({p: jnp.repeat(r, BATCH, axis=0) for p, r in one.items()}))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6 * np.abs(np.asarray(b)).max())


def test_reference_list_length_is_checked(setup):
    den = jax_unet(CONFIG, setup.den_sd)
    with pytest.raises(ValueError, match="reference has 1 entries"):
        den(*setup.args, num_frames=FRAMES, reference=dict(list(den.reference_kv(by_path(den, setup.bank)).items())[:1]))


def test_groupnorm_over_frames(setup):
    s = setup
    per_frame = jax_unet(CONFIG, s.den_sd)
    pooled = jax_unet(CONFIG, s.den_sd, groupnorm_over_frames=True)
    a = np.asarray(per_frame(*s.args, num_frames=FRAMES))
    b = np.asarray(pooled(*s.args, num_frames=FRAMES))
    assert np.abs(a - b).max() > 1e-2 * np.abs(a).max()
    with pooled_groupnorms(s.torch_den, FRAMES):
        ref = torch_denoise(s)
    assert_close(b, ref, UNET_TOL)
    # With one frame the two are the same model.
    x1 = jnp.asarray(s.x[::FRAMES])
    np.testing.assert_array_equal(
        np.asarray(pooled(x1, s.args[1], s.args[2])), np.asarray(per_frame(x1, s.args[1], s.args[2]))
    )


def test_bank_rounding_is_float16_forward_and_passes_small_gradients_back():
    """The bank's float16 rounding (Moore's ``.to(torch.float16)``) differentiated: its gradient is
    the identity in float32. Through the casts themselves a cotangent is rounded to float16 too,
    and the ~1e-8-and-below cotangents of a real training step there become zero."""
    import jax

    from anim_jax.models.unet import round_to_float16

    x = jnp.asarray(np.random.default_rng(0).standard_normal(256) * 10.0 ** np.arange(-4, 4).repeat(32), jnp.float32)
    np.testing.assert_array_equal(round_to_float16(x), x.astype(jnp.float16).astype(jnp.float32))
    assert not np.array_equal(round_to_float16(x), x)  # it does round
    for scale in (1.0, 1e-9):
        grad = jax.grad(lambda v: (round_to_float16(v) * scale).sum())(x)
        np.testing.assert_array_equal(grad, np.full(x.shape, scale, np.float32))
    # what differentiating the casts gives at the small scale (the bug this guards against)
    assert not jax.grad(lambda v: (v.astype(jnp.float16).astype(jnp.float32) * 1e-9).sum())(x).any()
