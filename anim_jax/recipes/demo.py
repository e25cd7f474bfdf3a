"""The built-in demo's training recipe (``anim-jax demo --train``): a small Animate Anyone at 64x64.

The exact pixel-unshuffle autoencoder (anim_jax/models/pixel_autoencoder.py) replaces the SD VAE,
so the demo needs no pretrained weights and its pixel metrics measure the denoiser alone. It
downsamples by 2 (64x64 frames -> 32x32 x 12 latents), so the PoseGuider has one stride-2 conv
instead of three. The factor is 2, not 4: with 4 the 48 latent channels would pass through the
UNet's first level, which cannot carry the per-pixel detail the denoiser has to predict at low
noise levels, and the samples stay noisy.

The data are the synthetic characters of ``data_pipelines.synthetic`` in palette mode (clothes in
named colours, training colour pairs only; the held-out characters wear the held-out pairs and
perform motions of another seed, see ``anim_jax.demo``), on plain light backgrounds.

Where the recipe departs from Moore's (a from-scratch model of this size, trained for minutes):

* x0-prediction (``diffusion.prediction_type="sample"``) with a plain MSE: v- and eps-prediction
  ask a small network to reproduce the exact per-pixel noise, which it learns far too slowly, and
  its samples stay noisy;
* a cosine learning-rate decay after a short warm-up instead of Moore's constant rate, and a
  learning rate ~100x Moore's (from scratch, not fine-tuning SD);
* the export keeps the training betas (scaled_linear) for inference instead of Moore's linear ones;
* stage 1 also trains the image encoder (Moore's is a frozen pretrained CLIP; a frozen random one
  gives the denoiser almost no global code of the reference's colours).

Variants (``get_config("stage1")``, ``"stage2"``, with a suffix):

* none: the shipped model (``anim_jax/demo_weights``), sized to train on 2 idle CPU cores in about
  67 minutes (README, "The demo"): 6000 stage-1 steps;
* ``,quick``: the test suite's short run: a smaller model at 32x32 for 40 + 4 steps; it
  shows learning (loss falls, the trained model beats the untrained one), not appearance transfer.
"""

from __future__ import annotations

import ml_collections

from anim_jax.recipes import stage1, stage2, tiny

FACTOR = 2  # pixel-unshuffle factor: 64x64 frames -> 32x32 x 12 latents
NUM_FRAMES = 4  # stage-2 clip length
BACKGROUNDS = ("plain",)  # synthetic background kinds of the demo's videos
PALETTE = "train"  # the training videos' clothes colours (data_pipelines.synthetic.PALETTE pairs)

VARIANTS = ("full", "quick")

# The shipped model's UNet (denoiser and ReferenceNet): three levels at 32, 16 and 8 latent pixels.
# Attention (self, reference and CLIP cross-attention) at 16x16, 8x8 and the mid block, none at
# 32x32: there the 1024-token self-attention over twice as many reference tokens made a training
# step 4.9x slower on CPU (3.98 s against 0.82 s at batch 8; benchmarks/RESULTS.md, "The demo") and
# a 4x4-pixel patch per token still resolves every body part of a 64x64 character. ~2.7M parameters
# each; all weights 11.7 MB in float16 (the package limit is 12 MB).
UNET = dict(
    block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    num_attention_heads=4,
    cross_attention_dim=64,
    norm_num_groups=16,
)
IMAGE_ENCODER = dict(tiny.IMAGE_ENCODER, hidden_size=64, intermediate_size=128, projection_dim=64)
# Motion modules at the 16x16 level only (0.27M parameters): at the 8x8 level too they took the
# weights to 12.9 MB, over the package limit.
MOTION = dict(tiny.MOTION, num_attention_heads=4, norm_num_groups=16, levels=(1,), use_mid_block=False)

# Per variant: resolution, model, and per stage (steps, global batch, peak lr); stage 2's batch counts clips.
# "full" is the shipped model, sized to train on 2 CPU cores (a GPU runs the same recipe faster).
SCHEDULE = {
    "full": dict(resolution=(64, 64), stage1=(6000, 8, 2e-3), stage2=(60, 4, 5e-4), workers=0),
    "quick": dict(resolution=(32, 32), stage1=(40, 8, 3e-3), stage2=(4, 4, 1e-3), workers=0),
}
# The synthetic training set per variant: videos x frames (rendered in parallel processes).
DATA = {"full": (480, 24), "quick": (16, 24)}


def variant_of(arg: str | None) -> tuple[str, str]:
    """``"stage1,quick"`` -> ("stage1", "quick"); checks the names."""
    parts = [p for p in (arg or "stage1").split(",") if p]
    stage_name, extra = parts[0], parts[1:]
    if stage_name not in ("stage1", "stage2") or len(extra) > 1 or any(p not in VARIANTS for p in extra):
        raise ValueError(f"the demo config: expected 'stage1' or 'stage2' with an optional ',quick', got {arg!r}")
    return stage_name, (extra[0] if extra else "full")


def components(variant: str = "full") -> dict:
    if variant == "quick":
        unet = dict(tiny.UNET, in_channels=3 * FACTOR**2, out_channels=3 * FACTOR**2)
        encoder = dict(tiny.IMAGE_ENCODER)
    else:
        unet = dict(UNET, in_channels=3 * FACTOR**2, out_channels=3 * FACTOR**2)
        encoder = dict(IMAGE_ENCODER)
    return dict(
        unet=unet,
        vae=dict(kind="pixel_unshuffle", factor=FACTOR),
        image_encoder=encoder,
        pose_guider=dict(conditioning_embedding_channels=unet["block_out_channels"][0], block_out_channels=(16, 32)),
    )


def resolution(variant: str = "full") -> tuple[int, int]:
    return tuple(SCHEDULE[variant]["resolution"])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    stage_name, variant = variant_of(arg)
    stage = 1 if stage_name == "stage1" else 2
    sched = SCHEDULE[variant]
    steps, batch, lr = sched[stage_name]
    c = (stage1 if stage == 1 else stage2).get_config("tiny")
    c.model.components = ml_collections.ConfigDict(components(variant))
    if stage == 2:
        # quick: one level of the tiny motion modules, which compiles in less of the suite's time
        motion = MOTION if variant != "quick" else dict(tiny.MOTION, levels=(1,), use_mid_block=False)
        c.model.motion = ml_collections.ConfigDict(dict(motion))
    c.data.update(resolution=resolution(variant), batch_size=batch, num_workers=sched["workers"], sample_margin=8,
                  clip_size=c.model.components.image_encoder.image_size)
    if stage == 2:
        c.data.update(n_frames=NUM_FRAMES, sample_rate=3)
    if stage == 1:
        # No pretrained CLIP here: a frozen randomly initialised encoder carries almost nothing of the
        # reference's look, so stage 1 trains it with the rest. Same recipe otherwise, 6000 steps:
        # held-out colour error 80.2 frozen -> 52.0 trained (benchmarks/RESULTS.md, "The demo").
        c.trainable.include = tuple(c.trainable.include) + (r"^image_encoder\.",)
    c.optimizer.update(lr=lr, total_steps=steps, schedule="cosine", warmup_steps=min(100, max(1, steps // 10)))
    c.diffusion.update(prediction_type="sample", export_beta_schedule="scaled_linear")
    c.loss.snr_gamma = None
    c.train.update(num_steps=steps, log_every=1 if variant == "quick" else 10, save_every=steps if variant == "quick" else 400, max_to_keep=1,
                   async_save=False, compute_flops=False)
    if variant == "quick":
        # 40 + 4 steps are compile-bound: XLA's backend level 0 compiles a tiny step ~25% faster
        # and runs it ~30% slower (benchmarks/RESULTS.md, "Training")
        c.train.xla_options = "xla_backend_optimization_level=0"
    c.validation.update(every=0, num_inference_steps=8, guidance_scale=1.0)
    return c
