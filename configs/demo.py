"""The built-in demo (``anim-jax demo``): the tiny stage configs with a pixel-unshuffle autoencoder.

The exact pixel-unshuffle autoencoder (anim_jax/models/pixel_autoencoder.py) replaces the SD VAE,
so the demo needs no pretrained weights and its pixel metrics measure the denoiser alone. It
downsamples by 2 (32x32 frames -> 16x16 x 12 latents), so the PoseGuider has one stride-2 conv
instead of three and the UNet reads and writes 3 * 2 * 2 = 12 latent channels; everything else is
the tiny architecture of configs/tiny.py. The factor is 2, not 4: with 4 the 48 latent channels
would pass through the UNet's 32-channel first level, which cannot carry the per-pixel noise the
denoiser has to predict at low noise levels, and the samples stay noisy.

``get_config("stage1")`` / ``get_config("stage2")``; a ``,quick`` suffix (``"stage1,quick"``) is
the shortened run of the test suite. The demo sets ``data.dataset`` and, for stage 2,
``init.weights_dir`` (the stage-1 export).
"""

from __future__ import annotations

import ml_collections

from configs import stage1, stage2, tiny

FACTOR = 2  # pixel-unshuffle factor: 32x32 frames -> 16x16 x 12 latents
RESOLUTION = (32, 32)
NUM_FRAMES = 4  # stage-2 clip length

# Training length (steps) and learning rate per stage, full demo vs the test suite's quick run.
SCHEDULE = {
    "full": dict(stage1_steps=600, stage2_steps=50, stage1_lr=2e-3, stage2_lr=1e-3),
    "quick": dict(stage1_steps=150, stage2_steps=10, stage1_lr=2e-3, stage2_lr=1e-3),
}


def components() -> dict:
    unet = dict(tiny.UNET, in_channels=3 * FACTOR**2, out_channels=3 * FACTOR**2)
    return dict(
        unet=unet,
        vae=dict(kind="pixel_unshuffle", factor=FACTOR),
        image_encoder=dict(tiny.IMAGE_ENCODER),
        pose_guider=dict(conditioning_embedding_channels=unet["block_out_channels"][0], block_out_channels=(16, 32)),
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "stage1").split(",") if p]
    stage_name, variant = parts[0], ("quick" if "quick" in parts[1:] else "full")
    if stage_name not in ("stage1", "stage2") or any(p != "quick" for p in parts[1:]):
        raise ValueError(f"configs/demo.py: expected 'stage1' or 'stage2' with an optional ',quick', got {arg!r}")
    stage = 1 if stage_name == "stage1" else 2
    sched = SCHEDULE[variant]
    c = (stage1 if stage == 1 else stage2).get_config("tiny")
    c.model.components = ml_collections.ConfigDict(components())
    c.data.update(resolution=RESOLUTION, batch_size=8, num_workers=0, sample_margin=8)
    if stage == 2:
        c.data.update(n_frames=NUM_FRAMES, batch_size=4, sample_rate=2)
    steps = sched[f"stage{stage}_steps"]
    c.optimizer.lr = sched[f"stage{stage}_lr"]
    c.optimizer.total_steps = steps
    c.train.update(num_steps=steps, log_every=1, save_every=steps, max_to_keep=1, async_save=False,
                   compute_flops=False)
    c.validation.every = 0
    return c
