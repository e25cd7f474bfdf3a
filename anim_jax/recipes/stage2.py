"""Stage 2: the motion modules only, on 24-frame clips.

Moore-AnimateAnyone ``configs/train/stage2.yaml`` (research/moore.md section 2.2): 512x512 x 24
frames at sample rate 4, batch 1 per GPU, lr 1e-5 (AdamW; Moore uses 8-bit AdamW, we keep full
AdamW states), gradient clipping 1.0, 10000 steps, gradient checkpointing, the same loss as stage 1,
validation every 20 steps with the linear-beta scheduler. The denoiser starts from the stage-1
result plus AnimateDiff v2 motion modules (``init.weights_dir`` = the stage-1 export or
``init.stage1_checkpoint``, and ``init.motion_modules``); the motion modules follow
``inference_v2.yaml`` (8 heads, 1 block, two temporal self-attentions, PE max length 32, all four
levels and the mid block, zero-initialised ``proj_out`` when no checkpoint is given).

``get_config("tiny")``: tiny models (``anim_jax.recipes.tiny``), 4-frame 64x64 clips.
"""

from __future__ import annotations

import ml_collections

from anim_jax.recipes import stage1, tiny

MOTION = dict(
    num_attention_heads=8,
    num_transformer_block=1,
    norm_num_groups=32,
    temporal_position_encoding_max_len=32,
    levels=(0, 1, 2, 3),
    use_mid_block=True,
    zero_initialize=True,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    is_tiny = arg == "tiny"
    c = stage1.base_config(2, arg)
    c.model.motion = ml_collections.ConfigDict(dict(tiny.MOTION if is_tiny else MOTION))
    c.model.remat = "none" if is_tiny else "full"
    c.trainable.update(include=(r"^denoiser\..*\.motion_modules\.",), exclude=())
    c.optimizer.total_steps = 10_000
    c.data.update(
        resolution=tiny.RESOLUTION if is_tiny else (512, 512),
        n_frames=tiny.NUM_FRAMES if is_tiny else 24,
        sample_rate=4,
        per_device_batch_size=1,
        batch_size=8 if is_tiny else 0,
    )
    c.train.update(num_steps=20 if is_tiny else 10_000)
    c.validation.update(
        every=0 if is_tiny else 20,
        num_samples=1,
        num_frames=tiny.NUM_FRAMES if is_tiny else 24,
        beta_schedule="linear",  # Moore's stage-2 validation scheduler
    )
    return c
