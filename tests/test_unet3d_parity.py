"""The denoiser UNet3D (UNet + AnimateDiff motion modules) against diffusers' UNetMotionModel.

CPU, fp32, every parameter randomised (motion ``proj_out`` included). diffusers pools the motion
modules' GroupNorm statistics over frames, the original AnimateDiff / Moore code does not (see
test_motion_parity.py); the torch side here runs those norms per frame. diffusers' UNetMotionModel
has no reference attention: for that test its spatial BasicTransformerBlocks get Moore's read-mode
forward (test_reference_attention.moore_read_forward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNetMotionModel
from flax import nnx

from anim_jax.convert.loader import expected_torch_shapes, load_torch_state_dict
from anim_jax.convert.mapping import export_torch_state_dict
from anim_jax.convert.model_configs import unet_config_from_diffusers
from anim_jax.convert.motion_keys import diffusers_to_original_keys
from anim_jax.convert.unet_keys import DENOISER_KEYMAP, DENOISER_KEYMAP_DIFFUSERS
from anim_jax.models.motion import MotionConfig, check_pe_buffers
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig
from test_motion_parity import _PerFrameGroupNorm
from test_reference_attention import moore_read_forward
from tolerance import assert_close
from test_unet_parity import UNET_TOL, inputs, randomize_, state_dict_numpy


@dataclasses.dataclass(frozen=True)
class Case:
    unet: dict  # diffusers UNet2DConditionModel config (ours is built from it)
    motion_heads: int
    max_len: int
    mid_block: bool
    batch: int
    frames: int
    hw: tuple[int, int]

    def motion(self) -> MotionConfig:
        n = len(self.unet["block_out_channels"])
        return MotionConfig(
            num_attention_heads=self.motion_heads, norm_num_groups=self.unet["norm_num_groups"],
            temporal_position_encoding_max_len=self.max_len, use_mid_block=self.mid_block, levels=tuple(range(n)),
        )

    def config(self) -> UNetConfig:
        return unet_config_from_diffusers(self.unet, motion=self.motion())


CASES = {
    # AnimateDiff v2 / Moore layout (mid-block module), 2 levels, 1x1-conv projections.
    "v2-2level": Case(
        unet=dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2, attention_head_dim=2,
                  cross_attention_dim=16, norm_num_groups=8),
        motion_heads=2, max_len=8, mid_block=True, batch=2, frames=4, hw=(8, 8)),
    # v1 layout (no mid-block module), 3 levels, per-block heads, Linear projections, two
    # transformer layers per attention, odd latent size (9x7 -> 5x4 -> 3x2 -> back).
    "v1-3level-odd": Case(
        unet=dict(block_out_channels=[16, 32, 32],
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                  attention_head_dim=[1, 2, 4], cross_attention_dim=24, norm_num_groups=4, use_linear_projection=True,
                  transformer_layers_per_block=2, in_channels=3, out_channels=5),
        motion_heads=4, max_len=5, mid_block=False, batch=1, frames=5, hw=(9, 7)),
}  # fmt: skip


@functools.cache
def torch_motion_unet(name: str, seed: int = 1) -> UNetMotionModel:
    c = CASES[name]
    u = c.unet
    n = len(u["block_out_channels"])
    model = UNetMotionModel(
        in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4),
        block_out_channels=tuple(u["block_out_channels"]),
        down_block_types=tuple("CrossAttnDownBlockMotion" if t.startswith("CrossAttn") else "DownBlockMotion"
                               for t in u["down_block_types"]),
        up_block_types=tuple("CrossAttnUpBlockMotion" if t.startswith("CrossAttn") else "UpBlockMotion"
                             for t in u["up_block_types"]),
        layers_per_block=u["layers_per_block"], num_attention_heads=u["attention_head_dim"],
        cross_attention_dim=u["cross_attention_dim"], norm_num_groups=u["norm_num_groups"],
        use_linear_projection=u.get("use_linear_projection", False),
        transformer_layers_per_block=u.get("transformer_layers_per_block", 1),
        motion_num_attention_heads=c.motion_heads, motion_max_seq_length=c.max_len, use_motion_mid_block=c.mid_block,
    )  # fmt: skip
    assert len(model.down_blocks) == n
    return randomize_(model, seed)


@contextlib.contextmanager
def per_frame_motion_norms(model):
    """The original's motion-module GroupNorm: statistics per frame (same weights and keys)."""
    norms = [m.norm for m in model.modules() if type(m).__name__ == "AnimateDiffTransformer3D"]
    assert norms
    saved = [n.__class__ for n in norms]
    for n in norms:
        n.__class__ = _PerFrameGroupNorm
    try:
        yield
    finally:
        for n, cls in zip(norms, saved):
            n.__class__ = cls


def torch_forward(model, x, t, ctx, frames: int) -> np.ndarray:
    """UNetMotionModel on our layout: x (B*F, H, W, C), t (B,), ctx (B, L, D) -> (B*F, H, W, C')."""
    n, h, w, c = x.shape
    sample = torch.from_numpy(np.ascontiguousarray(x.reshape(n // frames, frames, h, w, c).transpose(0, 4, 1, 2, 3)))
    context = torch.from_numpy(np.repeat(ctx, frames, axis=0))  # diffusers wants the context per frame
    with per_frame_motion_norms(model), torch.no_grad():
        out = model(sample, torch.from_numpy(t), context).sample.numpy()
    return out.transpose(0, 2, 3, 4, 1).reshape(n, h, w, -1)


@functools.lru_cache(maxsize=None)
def _abstract(cfg: UNetConfig):
    return nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))))


def jax_denoiser(cfg: UNetConfig, state_dict, keymap) -> UNet2DConditionModel:
    """Our UNet3D holding ``state_dict`` (strict load); built abstractly once per config."""
    graphdef, state = _abstract(cfg)
    model = nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state))
    return load_torch_state_dict(model, state_dict, keymap, source="test state dict")


_forward = nnx.jit(lambda m, x, t, ctx, reference, frames: m(x, t, ctx, num_frames=frames, reference=reference),
                   static_argnums=5)


def run(model, x, t, ctx, frames, reference=None) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), reference, frames))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    c = CASES[name]
    tm = torch_motion_unet(name)
    sd = state_dict_numpy(tm)
    x, t, ctx = inputs(c.unet, c.batch, c.frames, c.hw)
    return types.SimpleNamespace(name=name, c=c, tm=tm, sd=sd, x=x, t=t, ctx=ctx,
                                 ref=torch_forward(tm, x, t, ctx, c.frames))


def test_matches_diffusers_unet_motion_model_in_both_formats(case):
    c, sd = case.c, case.sd
    cfg = c.config()
    # layers_per_block modules per down block, one more per up block, maybe one in the mid block.
    n_modules = (2 * c.unet["layers_per_block"] + 1) * len(c.unet["block_out_channels"]) + int(c.mid_block)
    # diffusers format: 27 tensors per module (one pe buffer per block), original: 28 (one per attention block).
    orig = diffusers_to_original_keys(sd)
    assert len(orig) == len(sd) + n_modules
    assert check_pe_buffers(sd, cfg.motion) == n_modules and check_pe_buffers(orig, cfg.motion) == 2 * n_modules

    model_d = jax_denoiser(cfg, sd, DENOISER_KEYMAP_DIFFUSERS)
    out = run(model_d, case.x, case.t, case.ctx, c.frames)
    assert_close(out, case.ref, UNET_TOL)

    model_o = jax_denoiser(cfg, orig, DENOISER_KEYMAP)
    np.testing.assert_array_equal(run(model_o, case.x, case.t, case.ctx, c.frames), out)

    # Export gives back the original-format tensors bit for bit (pe buffers are not parameters).
    exported = export_torch_state_dict(model_o, DENOISER_KEYMAP)
    assert set(exported) == {k for k in orig if not k.endswith(".pe")}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, orig[k], err_msg=k)


def test_motion_modules_follow_the_naming_contract(case):
    c = case.c
    model = nnx.merge(*_abstract(c.config()))
    n = len(c.unet["block_out_channels"])
    lp = c.unet["layers_per_block"]
    assert [len(b.motion_modules) for b in model.down_blocks] == [lp] * n
    assert [len(b.motion_modules) for b in model.up_blocks] == [lp + 1] * n
    assert len(model.mid_block.motion_modules) == int(c.mid_block)
    paths = set(expected_torch_shapes(model, DENOISER_KEYMAP))
    leaf = "temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.weight"
    assert f"down_blocks.{n - 1}.motion_modules.{lp - 1}.{leaf}" in paths
    assert f"up_blocks.0.motion_modules.{lp}.{leaf}" in paths
    assert (f"mid_block.motion_modules.0.{leaf}" in paths) == c.mid_block
    # Motion modules at a subset of levels: down block i and up block n-1-i carry them.
    sub = unet_config_from_diffusers(c.unet, motion=dataclasses.replace(c.motion(), levels=(1,)))
    sub_model = nnx.merge(*_abstract(sub))
    assert [len(b.motion_modules) for b in sub_model.down_blocks] == [lp if i == 1 else 0 for i in range(n)]
    assert [len(b.motion_modules) for b in sub_model.up_blocks] == [lp + 1 if i == n - 2 else 0 for i in range(n)]


@contextlib.contextmanager
def moore_spatial_reader(model, bank: dict[str, np.ndarray], frames: int, fp16: bool):
    """Moore's read-mode forward on the spatial transformer blocks only (not the motion modules'
    BasicTransformerBlocks)."""
    blocks = {n: m for n, m in model.named_modules()
              if type(m).__name__ == "BasicTransformerBlock" and ".attentions." in n}  # fmt: skip
    assert set(blocks) == set(bank)
    for name, block in blocks.items():
        block.bank, block.bank_fp16, block.video_length = torch.from_numpy(bank[name]), fp16, frames
        block.forward = types.MethodType(moore_read_forward, block)
    try:
        yield
    finally:
        for block in blocks.values():
            del block.forward, block.bank, block.bank_fp16, block.video_length


def _reference_order(name: str):
    """Our documented reference order: down blocks, mid block, up blocks, then module indices."""
    parts = name.split(".")
    return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]], [int(p) if p.isdigit() else p for p in parts])


def test_reference_attention_with_motion_modules():
    """Moore's default: the reference rounded to float16 (the rounding itself and precomputed K/V
    are tested in test_reference_attention.py; the motion modules do not touch them)."""
    name = "v2-2level"
    c = CASES[name]
    tm = torch_motion_unet(name)
    model = jax_denoiser(c.config(), state_dict_numpy(tm), DENOISER_KEYMAP_DIFFUSERS)
    assert model.config.reference_fp16_rounding
    names = sorted((n for n, m in tm.named_modules()
                    if type(m).__name__ == "BasicTransformerBlock" and ".attentions." in n), key=_reference_order)  # fmt: skip
    assert len(names) == model.num_transformer_blocks
    rng = np.random.default_rng(3)
    tokens = [rng.standard_normal((c.batch, 6, tm.get_submodule(n).norm1.normalized_shape[0])).astype(np.float32)
              for n in names]  # fmt: skip
    x, t, ctx = inputs(c.unet, c.batch, c.frames, c.hw)
    with moore_spatial_reader(tm, dict(zip(names, tokens)), c.frames, fp16=True):
        want = torch_forward(tm, x, t, ctx, c.frames)
    kv = model.reference_kv(dict(zip(model.named_transformer_blocks(), map(jnp.asarray, tokens))))
    got = run(model, x, t, ctx, c.frames, reference=kv)
    assert_close(got, want, UNET_TOL)
    # The reference changes the output well beyond the tolerance (the test can fail).
    plain = run(model, x, t, ctx, c.frames)
    assert np.abs(plain - want).max() > 1e-2 * np.abs(want).max()


def test_window_longer_than_position_encoding_is_a_clear_error():
    c = CASES["v2-2level"]
    model = nnx.merge(*_abstract(c.config()))  # abstract: the check comes before any computation
    frames = c.max_len + 1
    x, t, ctx = inputs(c.unet, 1, frames, c.hw)
    with pytest.raises(ValueError, match=rf"num_frames={frames} .*temporal_position_encoding_max_len={c.max_len}"):
        model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), num_frames=frames)


def test_bad_motion_configs_are_clear_errors():
    c = CASES["v2-2level"]
    with pytest.raises(ValueError, match=r"motion\.levels=\(0, 2\): this UNet has only levels 0\.\.1"):
        unet_config_from_diffusers(c.unet, motion=dataclasses.replace(c.motion(), levels=(0, 2)))
    with pytest.raises(ValueError, match="ReferenceNet.*motion=None"):
        UNet2DConditionModel(c.config(), reference_net=True, rngs=nnx.Rngs(0))


def test_full_size_keys_match_moore_and_diffusers():
    """SD1.5 + AnimateDiff v2 motion modules (max_len 32), shapes only: 1232 parameters + 42 pe
    buffers = moore.md's 1274 denoiser tensors, 546 + 42 = 588 of them in motion modules; same keys
    and shapes as diffusers' UNetMotionModel (renamed to the original format)."""
    cfg = unet_config_from_diffusers(dict(cross_attention_dim=768), motion=MotionConfig())
    model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    ours = {k: s for k, (_, s) in expected_torch_shapes(model, DENOISER_KEYMAP).items()}
    assert len(ours) == 1232
    assert sum("motion_modules." in k for k in ours) == 546
    # The 2-D part is exactly the diffusers UNet2DConditionModel (686 tensors).
    assert len({k for k in ours if "motion_modules." not in k}) == 686

    with torch.device("meta"):
        diff = {k: tuple(v.shape) for k, v in UNetMotionModel(cross_attention_dim=768).state_dict().items()}
    assert len(diff) == 1253  # 686 + 21 * 27
    ours_diff = {k: s for k, (_, s) in expected_torch_shapes(model, DENOISER_KEYMAP_DIFFUSERS).items()}
    pe_diff = {k: s for k, s in diff.items() if k.endswith(".pe")}
    assert {k: s for k, s in diff.items() if k not in pe_diff} == ours_diff

    orig = diffusers_to_original_keys(diff)  # values are shapes here: only keys move
    pe = {k: s for k, s in orig.items() if k.endswith("pos_encoder.pe")}
    assert len(orig) == 1274 and len(pe) == 42
    assert sum("motion_modules." in k for k in orig) == 588
    assert {k: s for k, s in orig.items() if k not in pe} == ours
    assert all(s == (1, 32, int(ours[k.rsplit(".attention_blocks", 1)[0] + ".ff_norm.weight"][0])) for k, s in pe.items())
    # The buffers are exactly what the key maps ignore.
    ignored = [re.compile(p) for p in DENOISER_KEYMAP.ignored]
    assert {k for k in orig if any(p.search(k) for p in ignored)} == set(pe)
    ignored_d = [re.compile(p) for p in DENOISER_KEYMAP_DIFFUSERS.ignored]
    assert {k for k in diff if any(p.search(k) for p in ignored_d)} == set(pe_diff)
