"""Mutation test: each constant that parity depends on, perturbed alone, makes its parity comparison fail.

A parity tolerance is only as good as the bugs it catches. Each mutation below monkeypatches one
constant the way a plausible bug would get it wrong (an epsilon swapped with the other common
value, a 1% attention scale or latent scale, sin/cos or the frequency shift flipped, bfloat16
instead of float16 rounding, jax.image's half-pixel nearest rule instead of torch's floor rule)
and asserts that the matching parity comparison, with the same per-element tolerance as the parity
tests, then fails. The comparisons are plain functions on the tiniest configs (the torch side
computed once per session, ours run eagerly, so the patched Python is what executes).

Norm epsilons only matter where the normalised variance is small: on random O(1) activations a
1e-5 vs 1e-6 epsilon moves outputs by ~5e-6, inside float32 noise. The "quiet" cases (norm
affine parameters and layer biases x 0.1, inputs x 0.1; a flat image for the VAE) put every norm's
input variance near 1e-2..1e-3, where the epsilon moves outputs far beyond the tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import test_clip_parity as clip_t
import test_motion_parity as motion_t
import test_reference_attention as refattn_t
import test_unet_parity as unet_t
import test_vae_parity as vae_t
from anim_jax.convert.clip_keys import CLIP_KEYMAP
from anim_jax.convert.loader import load_torch_state_dict
from anim_jax.convert.motion_keys import MOTION_KEYMAP_DIFFUSERS
from anim_jax.models import clip as clip_m
from anim_jax.models import layers
from anim_jax.models import motion as motion_m
from anim_jax.models import transformer as transformer_m
from anim_jax.models import vae as vae_m
from anim_jax.models.motion import MotionModule
from anim_jax.models.unet import UNet2DConditionModel
from tolerance import Tol, assert_close, used

QUIET = 0.1


def quiet_(model: torch.nn.Module, keep=("conv_out",)) -> torch.nn.Module:
    """Norm affine parameters and every layer bias (but the output layer's) scaled by QUIET."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.mul_(QUIET)
                m.bias.mul_(QUIET)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None and name not in keep:
                m.bias.mul_(QUIET)
    return model


@dataclasses.dataclass
class Case:
    """``compare(setup)`` -> [(what, ours, ref)]; ``setup`` is built once (torch references included)."""

    build: Callable[[], object]
    compare: Callable[[object], list]
    tol: Tol

    @functools.cached_property
    def setup(self):
        return self.build()

    def worst(self) -> float:
        return max(used(o, r, self.tol) for _, o, r in self.compare(self.setup))


# -- UNet: quiet 2-level (norm epsilons, attention scale, timestep embedding) ---------------------


def _unet_quiet():
    cfg = unet_t.TINY_2L
    tm = quiet_(unet_t.torch_unet(cfg, seed=1))
    x, t, ctx = unet_t.inputs(cfg, 2, 2, (8, 8))
    x = (QUIET * x).astype(np.float32)
    ref = unet_t.torch_forward(tm, x, t, ctx, 2)
    return dict(model=unet_t.jax_unet(cfg, unet_t.state_dict_numpy(tm)), args=(x, t, ctx), ref=ref)


def _unet_compare(s, frames=2):
    x, t, ctx = (jnp.asarray(a) for a in s["args"])
    return [("unet", s["model"](x, t, ctx, num_frames=frames), s["ref"])]


# -- UNet: 3-level, odd latent size, freq_shift 1 / no flip (nearest rule, timestep embedding) ----


def _unet_odd():
    cfg = unet_t.TINY_3L
    tm = unet_t.torch_unet(cfg, seed=1)
    x, t, ctx = unet_t.inputs(cfg, 2, 1, (13, 10))
    return dict(model=unet_t.jax_unet(cfg, unet_t.state_dict_numpy(tm)), args=(x, t, ctx),
                ref=unet_t.torch_forward(tm, x, t, ctx, 1))


# -- Reference attention with Moore's float16 bank ------------------------------------------------


def _reference_fp16():
    c = refattn_t
    torch_ref, torch_den = unet_t.torch_unet(c.CONFIG, seed=11), unet_t.torch_unet(c.CONFIG, seed=12)
    ref_x, _, ref_ctx = unet_t.inputs(c.CONFIG, c.BATCH, 1, c.HW, seed=7)
    names, bank = unet_t.capture_attn1_inputs(torch_ref, ref_x, np.zeros((c.BATCH,), np.float32), ref_ctx)
    x, t, ctx = unet_t.inputs(c.CONFIG, c.BATCH, c.FRAMES, c.HW)
    with c.moore_reader(torch_den, dict(zip(names, bank)), c.FRAMES, fp16=True):
        ref = unet_t.torch_forward(torch_den, x, t, ctx, c.FRAMES)
    den = unet_t.jax_unet(c.CONFIG, unet_t.state_dict_numpy(torch_den), reference_fp16_rounding=True)
    return dict(model=den, args=(x, t, ctx), bank=bank, ref=ref)


def _reference_compare(s):
    x, t, ctx = (jnp.asarray(a) for a in s["args"])
    den = s["model"]
    kv = den.reference_kv(dict(zip(den.named_transformer_blocks(), map(jnp.asarray, s["bank"]))))
    out = den(x, t, ctx, num_frames=refattn_t.FRAMES, reference=kv)
    return [("denoiser with reference", out, s["ref"])]


# -- VAE on a flat image; the latent scale against diffusers' own config --------------------------


def _vae_flat():
    kw, (b, h, w) = vae_t.CONFIGS["a"]
    tm = vae_t.torch_vae(kw)
    x = (0.3 + 0.01 * np.random.default_rng(0).uniform(-1, 1, (b, h, w, 3))).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((b, h // 2, w // 2, 4)).astype(np.float32)
    sf = tm.config.scaling_factor  # diffusers' value, read from its own config
    with torch.no_grad():
        latents = vae_t.nhwc(tm.encode(vae_t.nchw(x)).latent_dist.mean * sf)
        decoded = np.clip(vae_t.nhwc(tm.decode(vae_t.nchw(z) / sf).sample) * 0.5 + 0.5, 0, 1)
    model = vae_t.load_vae_state_dict(vae_t.jax_vae(tm), vae_t.state_dict_np(tm))
    return dict(model=model, x=x, z=z, latents=latents, decoded=decoded)


def _vae_compare(s):
    from app_model import decode_latents, encode_latents

    return [("scaled latents", encode_latents(s["model"], jnp.asarray(s["x"])), s["latents"]),
            ("decoded", decode_latents(s["model"], jnp.asarray(s["z"])), s["decoded"])]


# -- CLIP and the motion module, quiet ------------------------------------------------------------


def _clip_quiet():
    kw = clip_t.CONFIGS["quick_gelu"]
    tm = quiet_(clip_t.torch_clip(kw))
    s = kw["image_size"]
    x = (QUIET * np.random.default_rng(0).standard_normal((3, s, s, 3))).astype(np.float32)
    with torch.no_grad():
        ref = tm(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).image_embeds.numpy()
    return dict(model=load_torch_state_dict(clip_t.jax_clip(kw), clip_t.state_dict_np(tm), CLIP_KEYMAP), x=x, ref=ref)


def _motion_quiet():
    c, adapter, cfg, sd = motion_t._case("c32-h2-f8")
    module = quiet_(copy.deepcopy(adapter.get_submodule(c["prefix"])), keep=("proj_out",))
    x = (QUIET * motion_t._input(c)).astype(np.float32)
    ref = motion_t._torch_forward(module, x)
    sd = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    model = load_torch_state_dict(MotionModule(32, cfg, rngs=nnx.Rngs(1)), sd, MOTION_KEYMAP_DIFFUSERS)
    return dict(model=model, x=x, ref=ref)


# Tolerances of the new cases: measured like the parity tests' (tolerance.py), 10x margin.
CASES = {
    "unet-quiet": Case(_unet_quiet, _unet_compare, Tol(rtol=1.5e-6, atol=1.5e-6)),
    "unet-3level-odd": Case(_unet_odd, functools.partial(_unet_compare, frames=1), unet_t.UNET_TOL),
    "reference-fp16": Case(_reference_fp16, _reference_compare, refattn_t.REFERENCE_TOL),
    "vae-flat": Case(_vae_flat, _vae_compare, Tol(rtol=1e-5, atol=1e-5)),
    "clip-quiet": Case(_clip_quiet, lambda s: [("image embeds", s["model"](jnp.asarray(s["x"])), s["ref"])],
                       Tol(rtol=5e-7, atol=5e-7)),
    "motion-quiet": Case(_motion_quiet, lambda s: [("motion", s["model"](jnp.asarray(s["x"])), s["ref"])],
                         Tol(rtol=7e-6, atol=7e-6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_original(name):
    case = CASES[name]
    for what, ours, ref in case.compare(case.setup):
        assert_close(ours, ref, case.tol, f"{name}: {what}")


# -- Mutations ------------------------------------------------------------------------------------


def _set_eps(kind, new):
    """Every norm of class ``kind`` in the case's model(s) whose path ``select`` accepts gets eps ``new``."""

    def mutate(mp, s, select=lambda path: True):
        hit = 0
        for path, node in nnx.iter_graph(s["model"]):
            if isinstance(node, kind) and select([str(p) for p in path]):
                mp.setattr(node, "eps", new)
                hit += 1
        assert hit, "the mutation touched nothing"

    return mutate


def _eps(kind, new, select=lambda path: True):
    f = _set_eps(kind, new)
    return lambda mp, s: f(mp, s, select)


def _resnet_or_out(path):
    return "resnets" in path or path[-1] == "conv_norm_out"


def _transformer_groupnorm(path):
    return "attentions" in path and path[-1] == "norm"


def _attention_scale(module, factor=1.01, name="dot_product_attention"):
    """q scaled by ``factor`` before the attention = a softmax scale ``factor`` x head_dim**-0.5."""

    def mutate(mp, s):
        original = getattr(module, name)
        mp.setattr(module, name, lambda q, k, v, *a, **kw: original(q * factor, k, v, *a, **kw))

    return mutate


def _timestep(flip=False, shift=0.0):
    def mutate(mp, s):
        original = layers.timestep_embedding

        def mutated(t, dim, *, flip_sin_to_cos, downscale_freq_shift, **kw):
            return original(t, dim, flip_sin_to_cos=flip_sin_to_cos != flip,
                            downscale_freq_shift=downscale_freq_shift + shift, **kw)

        mp.setattr(layers, "timestep_embedding", mutated)

    return mutate


def _half_pixel_nearest(mp, s):
    """jax.image.resize's nearest rule (half-pixel centres) instead of torch's floor(dst * in / out)."""
    mp.setattr(layers, "torch_nearest_indices",
               lambda n_in, n_out: np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out), n_in - 1).astype(np.int64))


def _bank_rounding(dtype):
    """The reference tokens rounded to ``dtype`` (None: not at all) instead of float16 before the
    denoiser projects them."""

    def mutate(mp, s):
        def reference_kv(self, tokens):
            out = {}
            for path, block in self.named_transformer_blocks().items():
                r = tokens[path]
                if r is not None and dtype is not None:
                    r = r.astype(dtype).astype(r.dtype)
                out[path] = None if r is None else block.attn1.project_kv(r)
            return out

        mp.setattr(UNet2DConditionModel, "reference_kv", reference_kv)

    return mutate


def _latent_scale(mp, s):
    vae = s["model"]
    mp.setattr(vae, "config", dataclasses.replace(vae.config, scaling_factor=vae.config.scaling_factor * 1.01))


MUTATIONS = {
    # norm epsilons: each swapped with the other common value (1e-5 <-> 1e-6)
    "unet-norm_eps(resnets,conv_norm_out)-1e-6": ("unet-quiet", _eps(layers.GroupNorm, 1e-6, _resnet_or_out)),
    "transformer2d-groupnorm-eps-1e-5": ("unet-quiet", _eps(layers.GroupNorm, 1e-5, _transformer_groupnorm)),
    "transformer-block-layernorm-eps-1e-6": ("unet-quiet", _eps(layers.LayerNorm, 1e-6)),
    "vae-groupnorm-eps-1e-5": ("vae-flat", _eps(layers.GroupNorm, 1e-5)),
    "clip-layernorm-eps-1e-6": ("clip-quiet", _eps(layers.LayerNorm, 1e-6)),
    "motion-groupnorm-eps-1e-5": ("motion-quiet", _eps(layers.GroupNorm, 1e-5)),
    "motion-layernorm-eps-1e-6": ("motion-quiet", _eps(layers.LayerNorm, 1e-6)),
    # attention softmax scale 1% off, per network
    "unet-attention-scale": ("unet-quiet", _attention_scale(transformer_m)),
    "vae-attention-scale": ("vae-flat", _attention_scale(vae_m)),
    "clip-attention-scale": ("clip-quiet", _attention_scale(clip_m)),
    "motion-attention-scale": ("motion-quiet", _attention_scale(motion_m, name="dot_product_attention_heads_first")),
    # timestep embedding (flip True / shift 0 in the 2-level config, flip False / shift 1 in the 3-level)
    "timestep-flip_sin_to_cos": ("unet-quiet", _timestep(flip=True)),
    "timestep-freq_shift+1": ("unet-quiet", _timestep(shift=1.0)),
    "timestep-flip_sin_to_cos(3level)": ("unet-3level-odd", _timestep(flip=True)),
    "timestep-freq_shift-1(3level)": ("unet-3level-odd", _timestep(shift=-1.0)),
    # latent scaling factor 1% off
    "latent-scaling-factor": ("vae-flat", _latent_scale),
    # Moore's float16 reference bank: bfloat16 instead, or not rounded
    "bank-bfloat16": ("reference-fp16", _bank_rounding(jnp.bfloat16)),
    "bank-unrounded": ("reference-fp16", _bank_rounding(None)),
    # nearest upsampling to an odd skip size
    "nearest-half-pixel": ("unet-3level-odd", _half_pixel_nearest),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_caught(name, monkeypatch):
    case_name, mutate = MUTATIONS[name]
    case = CASES[case_name]
    setup = case.setup
    # Ours runs eagerly (nothing jitted), so the patched Python is what computes.
    mutate(monkeypatch, setup)
    worst = case.worst()
    print(f"mutation {name}: {worst:.3g}x the tolerance on {case_name}")
    assert worst > 1, f"{name} survives {case_name}: it used only {worst:.3g} of the tolerance"
