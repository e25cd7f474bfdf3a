"""UNet2DConditionModel parity with diffusers (CPU, fp32, every parameter randomised).

Both sides are built from the same diffusers config dict (ours through convert.model_configs.unet_config_from_diffusers);
diffusers' state dict is loaded into ours strictly through UNET_KEYMAP. The helpers here are also
used by test_reference_attention.py and test_unet_sharding.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from anim_jax.convert.loader import expected_torch_shapes, load_torch_state_dict
from anim_jax.convert.mapping import CheckpointMismatchError, compose
from anim_jax.convert.model_configs import unet_config_from_diffusers
from anim_jax.convert.unet_keys import UNET_KEYMAP
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig
from tolerance import Tol, assert_close

OUTPUT_KEYS = ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias")

# Two levels, (CrossAttn, Down), int heads, 1x1-conv projections.
TINY_2L = dict(
    block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2,
    attention_head_dim=2,
    cross_attention_dim=16,
    norm_num_groups=8,
    use_linear_projection=False,
)
# Three levels, (CrossAttn, CrossAttn, Down), per-block heads, Linear projections, 2 transformer
# layers per attention, freq_shift 1 / flip False.
TINY_3L = dict(
    block_out_channels=[16, 32, 32],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=[1, 2, 4],
    cross_attention_dim=24,
    norm_num_groups=4,
    use_linear_projection=True,
    transformer_layers_per_block=2,
    flip_sin_to_cos=False,
    freq_shift=1,
    in_channels=3,
    out_channels=5,
)
# The SD1.5 layout (CrossAttn x3, Down; 16 transformer blocks), narrow.
TINY_SD = dict(
    block_out_channels=[16, 16, 32, 32],
    layers_per_block=2,
    attention_head_dim=2,
    cross_attention_dim=16,
    norm_num_groups=4,
)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm scales around 1, everything else ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, norms):
                    p.copy_((1.0 + 0.3 * noise) if name == "weight" else 0.3 * noise)
                elif p.ndim == 1:
                    p.copy_(0.3 * noise)
                else:
                    p.copy_(noise / np.sqrt(p[0].numel()))
    return model.eval()


def torch_unet(config: dict, seed: int) -> TorchUNet:
    return randomize_(TorchUNet(**config), seed)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _abstract_unet(cfg: UNetConfig, reference_net: bool):
    return nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, reference_net=reference_net, rngs=nnx.Rngs(0))))


def jax_unet(config: dict | UNetConfig, state_dict, *, reference_net=False, **overrides) -> UNet2DConditionModel:
    """Our UNet holding ``state_dict`` (strict load). Built abstractly (and cached): random init
    would trace or compile one kernel per parameter shape, which would dominate the test time."""
    cfg = config if isinstance(config, UNetConfig) else unet_config_from_diffusers(config, **overrides)
    graphdef, state = _abstract_unet(cfg, reference_net)
    model = nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state))
    if reference_net:
        state_dict = {k: v for k, v in state_dict.items() if k not in OUTPUT_KEYS}
    return load_torch_state_dict(model, state_dict, UNET_KEYMAP, source="diffusers state dict")


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return np.moveaxis(x.detach().numpy(), 1, -1)


# What our fp32 UNet reaches against diffusers' on these configs, with a 10x margin (tolerance.py).
UNET_TOL = Tol(rtol=8e-5, atol=8e-5)


def inputs(config: dict, batch: int, frames: int, hw: tuple[int, int], seed: int = 0, context_len: int = 3):
    """sample (B*F, H, W, C), timesteps (B,), context (B, L, D) as numpy."""
    rng = np.random.RandomState(seed)
    c_in = config.get("in_channels", 4)
    x = rng.randn(batch * frames, *hw, c_in).astype(np.float32)
    t = rng.uniform(0, 1000, size=(batch,)).astype(np.float32)
    ctx = rng.randn(batch, context_len, config["cross_attention_dim"]).astype(np.float32)
    return x, t, ctx


def torch_forward(model: TorchUNet, x, t, ctx, frames: int = 1) -> np.ndarray:
    """diffusers forward with frames folded into the batch (timesteps and context repeated)."""
    with torch.no_grad():
        out = model(
            nchw(x),
            torch.from_numpy(np.repeat(t, frames)),
            torch.from_numpy(np.repeat(ctx, frames, axis=0)),
        ).sample
    return nhwc(out)


@pytest.mark.parametrize(
    "config,batch,frames,hw",
    [
        (TINY_2L, 2, 2, (8, 8)),  # frames folded into the batch, context/time per video
        (TINY_3L, 2, 1, (13, 10)),  # 13x10 -> 7x5 -> 4x3: upsample to the skip's size
        (TINY_SD, 2, 1, (9, 7)),  # 9x7 -> 5x4 -> 3x2 -> 2x1
    ],
    ids=["2level", "3level-odd", "sd-layout-odd"],
)
# (Each config keeps one input shape across the tests of this file and its siblings: eager JAX
# compiles each op once per shape, so shared shapes keep the whole set fast.)
def test_unet_matches_diffusers(config, batch, frames, hw):
    tm = torch_unet(config, seed=1)
    ours = jax_unet(config, state_dict_numpy(tm))
    x, t, ctx = inputs(config, batch, frames, hw)
    ref = torch_forward(tm, x, t, ctx, frames)
    out = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), num_frames=frames)
    assert_close(out, ref, UNET_TOL)


def test_pose_features_added_after_conv_in():
    config = TINY_3L
    tm = torch_unet(config, seed=2)
    ours = jax_unet(config, state_dict_numpy(tm))
    x, t, ctx = inputs(config, 2, 1, (13, 10))
    pose = np.random.RandomState(5).randn(2, 13, 10, config["block_out_channels"][0]).astype(np.float32)
    handle = tm.conv_in.register_forward_hook(lambda module, args, out: out + nchw(pose))
    try:
        ref = torch_forward(tm, x, t, ctx)
    finally:
        handle.remove()
    out = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), pose_features=jnp.asarray(pose))
    assert_close(out, ref, UNET_TOL)


def test_scalar_timestep_is_shared():
    config = TINY_2L
    tm = torch_unet(config, seed=3)
    ours = jax_unet(config, state_dict_numpy(tm))
    x, _, ctx = inputs(config, 2, 2, (8, 8))
    a = ours(jnp.asarray(x), 321.0, jnp.asarray(ctx), num_frames=2)
    b = ours(jnp.asarray(x), jnp.full((2,), 321.0), jnp.asarray(ctx), num_frames=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _attn1_order(config: dict) -> list[str]:
    """The documented reference order, written out from the config."""
    n = len(config["block_out_channels"])
    down = config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    layers = config.get("layers_per_block", 2)
    tl = config.get("transformer_layers_per_block", 1)
    names = []
    for i in range(n):
        if down[i].startswith("CrossAttn"):
            names += [f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}" for j in range(layers) for k in range(tl)]
    names += [f"mid_block.attentions.0.transformer_blocks.{k}" for k in range(tl)]
    for i in range(n):
        if up[i].startswith("CrossAttn"):
            names += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}" for j in range(layers + 1) for k in range(tl)]
    return names


def capture_attn1_inputs(model: TorchUNet, x, t, ctx) -> tuple[list[str], list[np.ndarray]]:
    """Inputs of every BasicTransformerBlock's attn1, in call order (Moore's writer captures these)."""
    names, feats, handles = [], [], []
    for name, module in model.named_modules():
        if type(module).__name__ == "BasicTransformerBlock":
            def hook(mod, args, kwargs, name=name):
                names.append(name)
                feats.append((args[0] if args else kwargs["hidden_states"]).detach().numpy().copy())
            handles.append(module.attn1.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        torch_forward(model, x, t, ctx)
    finally:
        for h in handles:
            h.remove()
    return names, feats


@pytest.mark.parametrize("config,hw", [(TINY_SD, (9, 7)), (TINY_3L, (13, 10))], ids=["sd-layout", "3level"])
def test_reference_net_features(config, hw):
    tm = torch_unet(config, seed=4)
    sd = state_dict_numpy(tm)
    ref_net = jax_unet(config, sd, reference_net=True)
    # No output head: the key set is diffusers' minus conv_norm_out/conv_out.
    assert set(expected_torch_shapes(ref_net, UNET_KEYMAP)) == set(sd) - set(OUTPUT_KEYS)
    assert ref_net.conv_norm_out is None and ref_net.conv_out is None

    x, t, ctx = inputs(config, 2, 1, hw)
    names, ref_feats = capture_attn1_inputs(tm, x, t, ctx)
    assert names == _attn1_order(config)
    if config is TINY_SD:
        assert len(names) == 16
    feats = ref_net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    assert len(feats) == len(ref_feats) == ref_net.num_transformer_blocks
    for ours, ref in zip(feats.values(), ref_feats):
        assert_close(ours, ref, UNET_TOL)


def test_full_size_key_sets_match_diffusers():
    """SD1.5 size (abstract, no memory): 686 denoiser tensors, 682 ReferenceNet tensors, same keys
    and shapes as diffusers."""
    sd15 = dict(cross_attention_dim=768)
    with torch.device("meta"):
        torch_shapes = {k: tuple(v.shape) for k, v in TorchUNet(**sd15).state_dict().items()}
    cfg = unet_config_from_diffusers(sd15)
    for reference_net, count in ((False, 686), (True, 682)):
        model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, reference_net=reference_net, rngs=nnx.Rngs(0)))
        ours = {k: shape for k, (_, shape) in expected_torch_shapes(model, UNET_KEYMAP).items()}
        want = {k: s for k, s in torch_shapes.items() if not (reference_net and k in OUTPUT_KEYS)}
        assert len(ours) == count
        assert ours == want


def test_keymap_renames_are_idempotent():
    model = nnx.merge(*_abstract_unet(unet_config_from_diffusers(TINY_2L), False))
    once = expected_torch_shapes(model, UNET_KEYMAP)
    assert expected_torch_shapes(model, compose(UNET_KEYMAP, UNET_KEYMAP)) == once
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight" in once


def test_strict_loading_reports_mismatches():
    tm = torch_unet(TINY_2L, seed=0)
    sd = state_dict_numpy(tm)
    sd["extra.weight"] = np.zeros(3, np.float32)
    del sd["mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"to_out\.0\.bias[\s\S]*extra\.weight"):
        jax_unet(TINY_2L, sd)


def test_config_from_diffusers_full_config_and_heads():
    tm = TorchUNet(**TINY_3L)
    cfg = unet_config_from_diffusers(dict(tm.config), groupnorm_over_frames=True)  # every field diffusers writes
    assert cfg.num_attention_heads == (1, 2, 4)
    assert cfg.groupnorm_over_frames and cfg.use_linear_projection and cfg.transformer_layers_per_block == 2
    assert unet_config_from_diffusers({**TINY_2L, "_class_name": "UNet2DConditionModel"}).num_attention_heads == (2, 2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("resnet_time_scale_shift", "scale_shift"),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("act_fn", "gelu"),
        ("cross_attention_norm", "group_norm"),
        ("num_attention_heads", 8),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("transformer_layers_per_block", [1, 2]),
        ("layers_per_block", [1, 2]),
        ("only_cross_attention", [False, True]),
        ("some_future_option", "on"),
    ],
)
def test_unsupported_config_is_a_clear_error(field, value):
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers({**TINY_2L, field: value})


def test_unsupported_block_type_is_a_clear_error():
    bad = {**TINY_2L, "down_block_types": ["CrossAttnDownBlock2D", "AttnDownBlock2D"]}
    with pytest.raises(ValueError, match="down_block_types.*AttnDownBlock2D"):
        unet_config_from_diffusers(bad)
