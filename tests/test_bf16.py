"""bfloat16 compute against float32, same parameters and seed, step by step and at the end of
sampling, on the tiny pipeline and on a mid-size one; the numbers are in docs/numerics.md.

Parameters stay float32 in both; norms, softmax, the DDIM update and the latents carried between
steps are float32 by design (see docs/numerics.md), so what differs is the bf16 matmul/conv inputs
and activations. (The training step's bf16 loss and gradient norms: test_mesh_invariance.py.)
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anim_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from anim_jax.models.pose_guider import PoseGuider
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig
from anim_jax.models.vae import AutoencoderKL, VAEConfig
from anim_jax.pipeline import AnimatePipeline
from test_pipeline import HEIGHT, WIDTH, tiny_components

STEPS = 3
# Measured (docs/numerics.md), per DDIM step: latents' relative RMS error bf16 vs fp32; each
# bound is ~3x what is reached. A lower bound of 1e-3 at the end: below it, bf16 was not in effect.
TINY_STEP_BOUNDS = (0.006, 0.018, 0.037)  # reached 0.0020, 0.0060, 0.0123
MID_STEP_BOUNDS = (0.018, 0.045, 0.072)  # reached 0.0058, 0.0152, 0.0241
END_LOWER = 1e-3
# Decoded frames (uint8 levels), mean and max |d|; reached: tiny 0.24 and 2, mid-size 1.57 and 12.
TINY_FRAME_BOUNDS, MID_FRAME_BOUNDS = (0.7, 6), (4.5, 32)


def mid_components(dtype) -> dict:
    """A mid-size model: the tiny model's depth (so it compiles as fast) at 4x its widths, with
    head dimension 32 and 64-wide CLIP/cross-attention tokens; at 64x64 pixels the UNet attends
    over 32x32 latent tokens (1024 per frame, 2048 with the reference)."""
    unet = UNetConfig(
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, num_attention_heads=2,
        cross_attention_dim=64, norm_num_groups=32,
    )
    rngs = nnx.Rngs(0)
    parts = dict(
        denoiser=UNet2DConditionModel(unet, dtype=dtype, rngs=rngs),
        reference_net=UNet2DConditionModel(unet, reference_net=True, dtype=dtype, rngs=rngs),
        pose_guider=PoseGuider(64, (16, 32), dtype=dtype, rngs=rngs),
        vae=AutoencoderKL(VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32), dtype=dtype,
                          rngs=rngs),
        image_encoder=CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=1,
                             image_size=32, patch_size=8, projection_dim=64), dtype=dtype, rngs=rngs),
    )
    for i, m in enumerate(parts.values()):
        rng = np.random.default_rng(i)
        for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            # Kernels N(0, 1/fan_in) keep activations O(1) at these widths; norm scales 1 + 0.2 n.
            n = rng.standard_normal(var.shape)
            if var.ndim == 1:
                value = 1 + 0.2 * n if path[-1] == "scale" else 0.2 * n
            else:
                value = n / np.sqrt(np.prod(var.shape[:-1]))
            var.value = jnp.asarray(value, var.dtype)
    return parts


def _rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def _runs(components, ref_shape, pose_shape, **kw):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, ref_shape, dtype=np.uint8)
    poses = rng.integers(0, 256, pose_shape, dtype=np.uint8)
    kw = dict(steps=STEPS, seed=7, context_frames=4, context_overlap=1, output_type="both", keep_trajectory=True, **kw)
    return {name: AnimatePipeline(**components(dtype))(ref, poses, **kw)
            for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16))}


def _check(runs, what, step_bounds, frame_bounds):
    a, b = runs["bf16"], runs["fp32"]
    assert a.latents.dtype == np.float32 and np.isfinite(a.trajectory).all()
    assert a.trajectory.shape == (STEPS,) + a.latents.shape
    np.testing.assert_array_equal(a.trajectory[-1], a.latents)
    per_step = [_rel_rms(x, y) for x, y in zip(a.trajectory, b.trajectory)]
    frames = np.abs(a.frames.astype(np.float64) - b.frames.astype(np.float64))
    print(f"{what} bf16 vs fp32: latents rel RMS per step {', '.join(f'{e:.3g}' for e in per_step)}; end max |d| "
          f"{np.abs(a.latents - b.latents).max():.3g}; frames mean |d| {frames.mean():.3g}, max {frames.max():.0f} levels")
    assert per_step[-1] > END_LOWER
    for i, (e, bound) in enumerate(zip(per_step, step_bounds)):
        assert e < bound, f"{what}: step {i}: latents rel RMS {e:.3g} >= {bound}"
    assert frames.mean() < frame_bounds[0] and frames.max() <= frame_bounds[1]


@pytest.fixture(scope="module")
def tiny_runs():
    return _runs(tiny_components, (40, 30, 3), (4, 36, 28, 3), width=WIDTH, height=HEIGHT)


def test_bf16_tiny_pipeline_is_close_to_fp32_at_every_step(tiny_runs):
    _check(tiny_runs, "tiny", TINY_STEP_BOUNDS, TINY_FRAME_BOUNDS)


def test_bf16_mid_size_pipeline_is_close_to_fp32_at_every_step():
    _check(_runs(mid_components, (80, 64, 3), (4, 80, 64, 3), width=64, height=64), "mid-size",
           MID_STEP_BOUNDS, MID_FRAME_BOUNDS)
