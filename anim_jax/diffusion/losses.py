"""Training losses: SNR, min-SNR-γ weighting, the weighted MSE and offset noise.

Moore-AnimateAnyone (``train_stage_{1,2}.py``) trains with v-prediction and min-SNR-γ (γ = 5), with
the "snr + 1" form for v-prediction::

    snr = compute_snr(scheduler, t)            # (sqrt(ᾱ_t) / sqrt(1 - ᾱ_t)) ** 2
    if v_prediction: snr = snr + 1
    w = min(snr, γ) / snr
    loss = mean_b(w_b * mean(MSE_b))

With Moore's training schedule this gives w = 0.0043 at t = 0, 0.26 at t = 50, 0.57 at t = 100,
0.92 at t = 150 and exactly 1 for t >= 161.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anim_jax.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule, _check_choice


def snr(schedule: NoiseSchedule, t):
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at integer timesteps ``t`` (any shape), float32.

    Computed as diffusers' ``training_utils.compute_snr`` does: ``(sqrt(ᾱ) / sqrt(1 - ᾱ)) ** 2``.
    It is 0 at the last timestep of a zero-terminal-SNR schedule.
    """
    t = jnp.asarray(t)
    alpha_prod = jnp.take(jnp.asarray(schedule.alphas_cumprod), t, mode="fill")
    return (alpha_prod**0.5 / (1.0 - alpha_prod) ** 0.5) ** 2


def min_snr_weight(schedule: NoiseSchedule, t, gamma: float = 5.0, prediction_type: str | None = None):
    """Per-timestep min-SNR-γ loss weight, same shape as ``t``.

    * ``v_prediction`` (Moore's form): ``min(snr + 1, γ) / (snr + 1)``;
    * ``epsilon``: ``min(snr, γ) / snr``, taken as its limit 1 where snr = 0 (zero-terminal-SNR's last
      timestep), as diffusers' training scripts do;
    * ``sample`` (x0-prediction): ``min(snr, γ)``, the Min-SNR paper's weight for an x0 loss (Hang et
      al. 2023, eq. 8); it is 0 at a zero-SNR timestep, where x0 cannot be inferred from x_t.

    ``prediction_type`` defaults to the schedule's.
    """
    prediction_type = prediction_type or schedule.prediction_type
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    s = snr(schedule, t)
    if prediction_type == "v_prediction":
        s = s + 1.0
        return jnp.minimum(s, gamma) / s
    if prediction_type == "sample":
        return jnp.minimum(s, gamma)
    safe = jnp.where(s == 0, 1.0, s)
    return jnp.where(s == 0, 1.0, jnp.minimum(safe, gamma) / safe)


def diffusion_loss(pred, target, t, schedule: NoiseSchedule, snr_gamma: float | None = None):
    """``mean_b(w_b * mean(MSE_b))`` over a ``(B, ...)`` batch, in float32.

    ``w_b = min_snr_weight(schedule, t_b, snr_gamma)``; ``snr_gamma=None`` gives the plain MSE.
    ``t`` is the ``(B,)`` vector of training timesteps.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if snr_gamma is None:
        return jnp.mean(err)
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    t = jnp.asarray(t)
    if t.shape != per_sample.shape:
        raise ValueError(f"t must have shape ({pred.shape[0]},) to weight each sample, got {t.shape}")
    return jnp.mean(min_snr_weight(schedule, t, snr_gamma) * per_sample)


def offset_noise(key, shape, strength: float = 0.05, dtype=jnp.float32):
    """Gaussian noise plus ``strength`` x a second Gaussian shared over all axes but batch and channels.

    Channels-last: for ``shape = (B, ..., C)`` the offset has shape ``(B, 1, ..., 1, C)``. This is
    Moore's ``randn + 0.05 * randn(B, C, 1, 1, 1)`` in our layout.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"offset_noise needs a (B, ..., C) shape, got {shape}")
    k_noise, k_offset = jax.random.split(key)
    offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    noise = jax.random.normal(k_noise, shape, dtype)
    return noise + jnp.asarray(strength, dtype) * jax.random.normal(k_offset, offset_shape, dtype)
