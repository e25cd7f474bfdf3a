"""Forward process, prediction conversions and the DDIM update, in JAX.

Everything here is jit-able with traced timesteps: ᾱ is looked up with ``jnp.take`` in the
schedule's float32 table, which the trace embeds as a constant. A timestep is either a scalar (one
noise level for the whole batch, as in sampling) or a ``(B,)`` vector (one per sample, as in
training); per-sample coefficients broadcast over the remaining axes of a ``(B, ...)`` array.

Coefficients are float32 and the arithmetic follows ``diffusers.DDIMScheduler`` term by term;
results are cast back to the dtype of the sample argument.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from anim_jax.diffusion.schedules import NoiseSchedule


def _per_sample(x, ndim: int):
    """A scalar stays a scalar; a (B,) vector becomes (B, 1, ..., 1) to broadcast over rank ``ndim``."""
    if x.ndim > 1:
        raise ValueError(f"timesteps must be a scalar or a (B,) vector, got shape {x.shape}")
    return x.reshape(x.shape + (1,) * (ndim - 1)) if x.ndim == 1 else x


def _take(table, t, ndim: int):
    """``table[t]`` shaped to broadcast against a rank-``ndim`` array batched on axis 0.

    An out-of-range timestep gives NaN (``jnp.take``'s "fill" mode), never a silently clamped value.
    """
    return _per_sample(jnp.take(jnp.asarray(table), jnp.asarray(t), mode="fill"), ndim)


def _alpha_beta(schedule: NoiseSchedule, t, ndim: int):
    alpha_prod = _take(schedule.alphas_cumprod, t, ndim)
    return alpha_prod, 1.0 - alpha_prod


def add_noise(schedule: NoiseSchedule, x0, noise, t):
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise (``DDIMScheduler.add_noise``)."""
    a, b = _alpha_beta(schedule, t, jnp.ndim(x0))
    return (a**0.5 * x0 + b**0.5 * noise).astype(jnp.result_type(x0))


def velocity(schedule: NoiseSchedule, x0, noise, t):
    """v = sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0 (``DDIMScheduler.get_velocity``), the v-prediction target."""
    a, b = _alpha_beta(schedule, t, jnp.ndim(x0))
    return (a**0.5 * noise - b**0.5 * x0).astype(jnp.result_type(x0))


def training_target(schedule: NoiseSchedule, x0, noise, t):
    """What the model learns to predict under ``schedule.prediction_type``: noise, velocity or the
    clean sample."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "sample":
        return jnp.asarray(x0)
    return velocity(schedule, x0, noise, t)


def predict_x0_eps(schedule: NoiseSchedule, model_output, t, sample):
    """(x̂0, ε̂) from a model output at timestep ``t``, under ``schedule.prediction_type``.

    With zero-terminal-SNR, epsilon-prediction is undefined at the last timestep (ᾱ = 0 divides),
    exactly as in diffusers; v-prediction is well defined everywhere.
    """
    a, b = _alpha_beta(schedule, t, jnp.ndim(sample))
    if schedule.prediction_type == "epsilon":
        x0 = (sample - b**0.5 * model_output) / a**0.5
        eps = model_output
    elif schedule.prediction_type == "sample":
        x0 = model_output
        eps = (sample - a**0.5 * model_output) / b**0.5
    else:  # v_prediction
        x0 = a**0.5 * sample - b**0.5 * model_output
        eps = a**0.5 * model_output + b**0.5 * sample
    return x0, eps


def predict_x0(schedule: NoiseSchedule, model_output, t, sample):
    return predict_x0_eps(schedule, model_output, t, sample)[0]


def predict_eps(schedule: NoiseSchedule, model_output, t, sample):
    return predict_x0_eps(schedule, model_output, t, sample)[1]


def ddim_step(
    schedule: NoiseSchedule,
    model_output,
    timestep,
    sample,
    num_inference_steps: int,
    eta=0.0,
    noise=None,
):
    """One DDIM update x_t -> x_{t_prev}: ``DDIMScheduler.step(...).prev_sample``.

    ``t_prev = t - T // num_inference_steps`` (diffusers' rule for every spacing); for ``t_prev < 0``
    ᾱ_prev is ``schedule.final_alpha_cumprod``. ``num_inference_steps`` must be a Python int;
    ``timestep`` may be traced (a scalar, or ``(B,)`` per sample). ``eta > 0`` adds
    ``eta * sigma_t * noise`` and needs ``noise`` (the ``variance_noise`` of diffusers); a concrete
    ``eta > 0`` without ``noise`` is an error. Clips x̂0 when ``schedule.clip_sample``.
    """
    if isinstance(eta, numbers.Number) and eta != 0 and noise is None:
        raise ValueError("ddim_step with eta > 0 needs `noise` (diffusers' variance_noise)")
    step_ratio = schedule.num_train_timesteps // int(num_inference_steps)
    ndim = jnp.ndim(sample)
    timestep = jnp.asarray(timestep)
    prev_timestep = timestep - step_ratio

    alpha_prod_t = _take(schedule.alphas_cumprod, timestep, ndim)
    alpha_prod_prev = jnp.where(
        _per_sample(prev_timestep >= 0, ndim),
        _take(schedule.alphas_cumprod, jnp.maximum(prev_timestep, 0), ndim),
        jnp.float32(schedule.final_alpha_cumprod),
    )
    beta_prod_t = 1.0 - alpha_prod_t
    beta_prod_prev = 1.0 - alpha_prod_prev

    pred_x0, pred_eps = predict_x0_eps(schedule, model_output, timestep, sample)
    if schedule.clip_sample:
        r = schedule.clip_sample_range
        pred_x0 = jnp.clip(pred_x0, -r, r)

    variance = (beta_prod_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev)
    std_dev_t = eta * variance**0.5
    direction = (1.0 - alpha_prod_prev - std_dev_t**2) ** 0.5 * pred_eps
    prev_sample = alpha_prod_prev**0.5 * pred_x0 + direction
    if noise is not None:
        prev_sample = prev_sample + std_dev_t * noise
    return prev_sample.astype(jnp.result_type(sample))
