"""The Animate Anyone training loss (Moore-AnimateAnyone ``train_stage_{1,2}.py``, research/moore.md 5.3).

Per step:

1. ``latents = vae.encode(target).sample() * scaling``; stage 1 has a frame axis of 1, stage 2 F.
2. ``noise = randn + noise_offset * randn(B, 1, .., C)`` (offset noise, 0.05).
3. ``t ~ U{0 .. T-1}`` per sample; ``noisy = add_noise(latents, noise, t)`` and the target
   ``velocity(latents, noise, t)`` under the zero-SNR scaled_linear *training* schedule.
4. With probability ``uncond_ratio`` (0.1) a sample is unconditional: its CLIP input is a zero image
   (Moore zeroes the normalised pixel values and encodes them) and it gets **no reference
   attention** (its reference keys are masked, see ``models.animate_anyone``). Otherwise the
   ReferenceNet's features (timestep 0, reference latents sampled from the VAE, the sample's CLIP
   context) are appended to every self-attention of the denoiser; gradients flow into the
   ReferenceNet (stage 1).
5. ``pred = denoiser(noisy, t, clip, reference, pose_guider(pose))``; the loss is the min-SNR-γ
   (γ = 5, v-prediction "snr + 1" form) weighted MSE.

Cost of the exact one-pass unconditional samples: the ReferenceNet forward/backward and the
attention over the (masked) reference keys are spent on the ~10% unconditional samples too;
nothing runs twice. Moore draws one decision per step and per GPU (``random.random() <
uncond_ratio`` for its whole local batch, skipping the ReferenceNet); ``uncond_per_sample=False``
draws one decision for the whole global batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from anim_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    diffusion_loss,
    min_snr_weight,
    moore_training_schedule,
    training_target,
)
from anim_jax.models.animate_anyone import AnimateAnyone
from anim_jax.train import metrics as metrics_lib
from anim_jax.train.batches import as_video_batch

@dataclasses.dataclass(frozen=True)
class LossConfig:
    uncond_ratio: float = 0.1
    uncond_per_sample: bool = True  # False: one draw for the whole (global) batch
    noise_offset: float = 0.05
    snr_gamma: float | None = 5.0  # None: plain MSE
    timestep_buckets: int = 4  # loss_t/<lo>-<hi> metrics

    @classmethod
    def from_config(cls, cfg) -> "LossConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(cfg) if cfg is not None else {}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config.loss: unknown field(s) {unknown}; known: {sorted(names)}")
        out = cls(**values)
        if not 0.0 <= out.uncond_ratio <= 1.0:
            raise ValueError(f"config.loss.uncond_ratio must be in [0, 1], got {out.uncond_ratio}")
        return out


class TrainingDraws(NamedTuple):
    """The random draws of one training step, channels-last; ``training_loss`` is deterministic given
    them (so the objective can be compared draw for draw with another implementation's).

    ``posterior``: N(0, 1) draws of the VAE posterior, (B*F + B, h, w, C), the target frames (frame
    index fastest) then the references; ``noise`` (B, F, h, w, C) and ``offset`` (B, C): N(0, 1),
    combined as ``noise + noise_offset * offset`` (broadcast over frames and space); ``t`` (B,)
    int32 timesteps; ``uncond`` (B,) bool, the unconditional samples."""

    posterior: jax.Array
    noise: jax.Array
    offset: jax.Array
    t: jax.Array
    uncond: jax.Array


def draw(loss_cfg: LossConfig, rng, *, batch: int, frames: int, latent_shape, num_train_timesteps: int) -> TrainingDraws:
    """One step's draws from ``rng``; ``latent_shape`` = (h, w, C) of one frame's latent."""
    b, f = batch, frames
    k_lat, k_noise, k_t, k_unc = jax.random.split(rng, 4)
    k_noise, k_offset = jax.random.split(k_noise)  # the key split ``diffusion.offset_noise`` makes
    posterior = jax.random.normal(k_lat, (b * f + b, *latent_shape), jnp.float32)
    noise = jax.random.normal(k_noise, (b, f, *latent_shape), jnp.float32)
    offset = jax.random.normal(k_offset, (b, latent_shape[-1]), jnp.float32)
    t = jax.random.randint(k_t, (b,), 0, num_train_timesteps)
    if loss_cfg.uncond_per_sample:
        uncond = jax.random.bernoulli(k_unc, loss_cfg.uncond_ratio, (b,))
    else:
        uncond = jnp.broadcast_to(jax.random.bernoulli(k_unc, loss_cfg.uncond_ratio), (b,))
    return TrainingDraws(posterior, noise, offset, t, uncond)


def training_loss(model: AnimateAnyone, batch, draws: TrainingDraws, loss_cfg: LossConfig, schedule: NoiseSchedule):
    """``(loss, aux)`` of ``batch`` under the given draws (see ``make_loss_fn``)."""
    frames, poses, reference, clip = as_video_batch(batch)
    b, f = frames.shape[:2]
    # One VAE pass over the target frames and the reference images.
    both = model.encode(jnp.concatenate([frames.reshape((b * f,) + frames.shape[2:]), reference]),
                        eps=draws.posterior)
    latents, ref_latents = both[: b * f].reshape((b, f) + both.shape[1:]), both[b * f:]
    offset = draws.offset.reshape((b,) + (1,) * (latents.ndim - 2) + draws.offset.shape[-1:])
    noise = draws.noise + jnp.asarray(loss_cfg.noise_offset, draws.noise.dtype) * offset
    t, uncond = draws.t, draws.uncond
    noisy = add_noise(schedule, latents, noise, t)
    target = training_target(schedule, latents, noise, t)
    context = model.image_context(clip, zero_image=uncond)
    kv = model.reference(ref_latents, context, enabled=~uncond)
    pred = model.predict(noisy, t, context, reference=kv, pose_features=model.pose_features(poses))
    loss = diffusion_loss(pred, target, t, schedule, loss_cfg.snr_gamma)
    per_sample = jnp.mean(jnp.square(pred - target).reshape(b, -1), axis=1)
    weight = min_snr_weight(schedule, t, loss_cfg.snr_gamma) if loss_cfg.snr_gamma else jnp.ones_like(per_sample)
    aux = dict(mse=per_sample.mean(), snr_weight=weight.mean(), uncond_fraction=uncond.mean(dtype=jnp.float32))
    aux.update(metrics_lib.timestep_bucket_losses(weight * per_sample, t, loss_cfg.timestep_buckets,
                                                  schedule.num_train_timesteps))
    return loss, aux


def make_loss_fn(loss_cfg: LossConfig, schedule: NoiseSchedule | None = None):
    """``loss_fn(model: AnimateAnyone, batch, rng) -> (loss, aux)`` for ``train.state``: ``draw``
    from ``rng``, then ``training_loss``.

    ``aux``: ``mse`` (unweighted), ``snr_weight`` (mean min-SNR weight), ``uncond_fraction`` and the
    weighted loss per timestep bucket (``loss_t/000-249`` ...; NaN where a bucket is empty).
    """
    schedule = schedule or moore_training_schedule()

    def loss_fn(model: AnimateAnyone, batch, rng):
        frames = batch["frames"] if "frames" in batch else batch["target"][:, None]
        b, f, h, w = frames.shape[:4]
        s = model.latent_downscale
        draws = draw(loss_cfg, rng, batch=b, frames=f, latent_shape=(h // s, w // s, model.latent_channels),
                     num_train_timesteps=schedule.num_train_timesteps)
        return training_loss(model, batch, draws, loss_cfg, schedule)

    return loss_fn
