"""Diffusion maths in pure JAX/numpy: noise schedules, DDIM, training losses, long-video windows."""

from anim_jax.diffusion.ddim import (
    add_noise,
    ddim_step,
    predict_eps,
    predict_x0,
    predict_x0_eps,
    training_target,
    velocity,
)
from anim_jax.diffusion.losses import diffusion_loss, min_snr_weight, offset_noise, snr
from anim_jax.diffusion.schedules import (
    NoiseSchedule,
    moore_inference_schedule,
    moore_training_schedule,
    rescale_zero_terminal_snr,
)
from anim_jax.diffusion.windows import context_windows, pad_windows, window_weights, windows_array

__all__ = [
    "NoiseSchedule",
    "add_noise",
    "context_windows",
    "ddim_step",
    "diffusion_loss",
    "min_snr_weight",
    "moore_inference_schedule",
    "moore_training_schedule",
    "offset_noise",
    "pad_windows",
    "predict_eps",
    "predict_x0",
    "predict_x0_eps",
    "rescale_zero_terminal_snr",
    "snr",
    "training_target",
    "velocity",
    "window_weights",
    "windows_array",
]
