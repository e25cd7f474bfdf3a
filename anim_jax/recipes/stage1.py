"""Stage 1: denoiser (2-D) + ReferenceNet + PoseGuider on single target frames.

Moore-AnimateAnyone ``configs/train/stage1.yaml`` (research/moore.md section 2.2): 768x768, batch 4
per GPU, AdamW lr 1e-5 (betas 0.9/0.999, weight decay 1e-2, eps 1e-8), constant schedule with
warm-up 1, gradient clipping 1.0, 30000 steps, uncond ratio 0.1, noise offset 0.05, min-SNR
gamma 5, zero-SNR scaled_linear training schedule, no gradient checkpointing, frozen VAE/CLIP in
half precision, seed 12580, validation every 200 steps (20 DDIM steps, guidance 3.5).

``get_config()`` is the full recipe (SD1.5 sizes; set ``init.weights_dir``); ``get_config("tiny")``
shrinks the models (``anim_jax.recipes.tiny``) and the data for CPU tests and demos. Every field can be
overridden on the command line: ``--config.optimizer.lr=2e-5 --config.data.dataset=/data/ubc``.
"""

from __future__ import annotations

import ml_collections

from anim_jax.parallel import DEFAULT_RULES
from anim_jax.train import optim
from anim_jax.recipes import tiny

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    num_attention_heads=8,
    cross_attention_dim=768,  # sd-image-variations: the CLIP image embedding is one 768-d token
    norm_num_groups=32,
)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4)
CLIP_VIT_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
    image_size=224, patch_size=14, projection_dim=768,
)
POSE_GUIDER = dict(conditioning_embedding_channels=320, block_out_channels=(16, 32, 96, 256))


def base_config(stage: int, variant: str | None) -> ml_collections.ConfigDict:
    if variant not in (None, "", "tiny"):
        raise ValueError(f"unknown config variant {variant!r}; expected none or 'tiny'")
    is_tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.stage = stage  # the data layer's sampling (1: single frames, 2: clips) and run metadata
    c.seed = 12580

    # Where the weights come from (anim_jax.train.weights.init_model). Empty: not used.
    c.init = ml_collections.ConfigDict(dict(
        weights_dir="",  # converted-weights directory (anim-jax convert, or a stage-1 export)
        controlnet="",  # stage 1: ControlNet-openpose checkpoint -> PoseGuider
        stage1_checkpoint="",  # stage 2: a stage-1 run's <workdir>/checkpoints
        stage1_step=-1,  # -1: the latest
        motion_modules="",  # stage 2: AnimateDiff mm_sd_v15_v2.ckpt
        reference_net_from_denoiser=True,  # a ReferenceNet without weights starts as a copy of the denoiser
    ))

    c.model = ml_collections.ConfigDict(dict(
        compute_dtype="float32" if is_tiny else "bfloat16",  # activations; master params stay float32
        frozen_dtype="" if is_tiny else "bfloat16",  # storage of frozen params ("": unchanged)
        attention="xla" if is_tiny else "auto",  # xla | chunked | cudnn | auto
        query_chunk_size=1024,
        remat="none",  # none | full | dots: per ResNet / transformer / motion block
        groupnorm_over_frames=False,  # ResNet GroupNorm statistics per frame (inflated), as Moore's stage 2
        components=tiny.components() if is_tiny else dict(
            unet=dict(SD15_UNET), vae=dict(SD15_VAE), image_encoder=dict(CLIP_VIT_L14), pose_guider=dict(POSE_GUIDER),
        ),
        motion=None,  # the motion-module architecture (MotionConfig fields); None: a 2-D denoiser (stage 1)
    ))

    # What trains: parameters whose path matches an include regex and no exclude regex
    # (anim_jax.train.stages.trainable_filter); everything else is frozen. Stage 1: the denoiser,
    # the ReferenceNet except its last up block (only its first norm1 output is used) and the
    # PoseGuider. ``{last_up_block}`` is that block's index.
    c.trainable = ml_collections.ConfigDict(dict(
        include=(r"^denoiser\.", r"^reference_net\.", r"^pose_guider\."),
        exclude=(r"^reference_net\.up_blocks\.{last_up_block}\.",),
    ))

    # The noise schedules (anim_jax.train.schedules.training_schedule / export_schedule). Moore
    # trains on zero-SNR scaled_linear betas but ships linear betas for inference (moore.md §2.4).
    c.diffusion = ml_collections.ConfigDict(dict(
        prediction_type="v_prediction",  # v_prediction | epsilon | sample (x0)
        beta_schedule="scaled_linear",  # training
        export_beta_schedule="linear",  # written into the export's anim_jax.json for inference
    ))

    c.loss = ml_collections.ConfigDict(dict(
        uncond_ratio=0.1, uncond_per_sample=True, noise_offset=0.05, snr_gamma=5.0, timestep_buckets=4,
    ))

    c.optimizer = optim.default_config()  # Moore: AdamW 1e-5, betas (0.9, 0.999), wd 1e-2, eps 1e-8, clip 1.0
    c.optimizer.total_steps = 30_000

    c.mesh = ml_collections.ConfigDict(dict(
        shape=(1, -1, 1),  # -1: all remaining devices
        axis_names=("data", "fsdp", "tensor"),
        rules=DEFAULT_RULES,
        num_devices=0,  # 0: every device; N: the first N (tests)
    ))

    c.data = ml_collections.ConfigDict(dict(
        dataset="",  # directory written by `anim-jax prepare` (or make-synthetic)
        resolution=tiny.RESOLUTION if is_tiny else (768, 768),  # (height, width)
        sample_margin=30,
        n_frames=1,
        sample_rate=4,
        clip_size=tiny.CLIP_SIZE if is_tiny else 224,
        per_device_batch_size=4,
        batch_size=8 if is_tiny else 0,  # global; 0: per_device_batch_size x devices
        num_workers=0 if is_tiny else 8,
        read_threads=1,
        prefetch=2,
        uint8_output=True,  # float conversion on the device, inside the step
        seed=0,
    ))

    c.train = ml_collections.ConfigDict(dict(
        num_steps=30_000,
        log_every=50,
        save_every=2000,
        max_to_keep=3,
        async_save=True,
        include_frozen=True,  # checkpoints hold the frozen weights too (self-contained)
        export=True,  # at the end: <workdir>/export, a converted-weights directory (next stage's init)
        peak_flops_per_device=0.0,  # 0: guessed from the device kind
        compute_flops=True,  # XLA cost analysis of the step for MFU (one extra compile when remat is on)
        # XLA options for compiling the train step, "key=value,key=value" (per compilation, unlike
        # XLA_FLAGS), e.g. xla_backend_optimization_level=0: a faster compile for a short CPU run
        xla_options="",
    ))

    c.validation = ml_collections.ConfigDict(dict(
        every=200,  # steps; 0 disables
        num_samples=4,
        num_frames=1,
        num_inference_steps=20,
        guidance_scale=3.5,
        beta_schedule="scaled_linear",  # Moore's stage-1 validation scheduler
        fps=8.0,
        seed=42,
    ))

    if is_tiny:
        c.optimizer.lr = 1e-3
        c.optimizer.total_steps = 100
        c.train.update(num_steps=20, log_every=5, save_every=10, async_save=False)
        c.validation.update(every=0, num_samples=2, num_inference_steps=3)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return base_config(1, arg)
