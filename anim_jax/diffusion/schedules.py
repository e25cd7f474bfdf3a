"""Noise schedules: betas, ᾱ (alphas_cumprod), zero-terminal-SNR rescale and inference timesteps.

Semantics follow ``diffusers.DDIMScheduler`` (the scheduler Moore-AnimateAnyone uses everywhere).
The arrays are computed host-side in numpy once per schedule and reproduce diffusers' CPU numerics:
torch builds the betas in float32, rescales them in float32 and takes the cumulative product with a
float64 accumulator (ATen's CPU ``cumprod`` accumulates in ``acc_type<float> = double``); we do the
same. The remaining difference (torch's float32 ``linspace`` and ``sqrt`` are not correctly rounded
on every CPU) stays below 4e-7 in ᾱ, measured against diffusers 0.42 on the Moore schedules.

``NoiseSchedule`` holds only the configuration, so it is hashable and can be closed over by (or be a
static argument of) jitted functions; the arrays are computed lazily and cached on the instance.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last ᾱ is exactly 0 (Lin et al. 2023, Algorithm 1), as diffusers does.

    Operation order and dtype (float32, cumprod accumulated in float64) follow diffusers'
    ``rescale_zero_terminal_snr`` run on CPU.
    """
    betas = np.asarray(betas, dtype=np.float32)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_bar_sqrt = np.sqrt(_cumprod(alphas))
    a0, aT = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * np.float32(a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
    # float32 values, float64 running product, rounded to float32 (torch CPU cumprod semantics).
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A DDIM/DDPM noise schedule (the subset of ``diffusers.DDIMScheduler``'s config we use).

    Fields have diffusers' names and meanings, so a diffusers ``scheduler_config`` or Moore's
    ``noise_scheduler_kwargs`` can be passed to :meth:`from_config`. Defaults are diffusers' except
    ``beta_start``/``beta_end``, which default to Stable Diffusion's values.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if int(self.steps_offset) != self.steps_offset:
            raise ValueError(f"steps_offset must be an integer, got {self.steps_offset!r}")
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers-style dict. Keys starting with ``_`` (``_class_name``, ...) are ignored;
        options this port does not implement are an error unless they hold diffusers' inert default."""
        inert = {"trained_betas": None, "thresholding": False, "skip_prk_steps": True}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in names:
                kwargs[key] = value
            elif key in inert and value == inert[key]:
                continue
            else:
                unknown.append(f"{key}={value!r}")
        if unknown:
            raise ValueError(
                f"unsupported noise schedule options: {', '.join(unknown)}; supported: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)

    # ----------------------------------------------------------------------------------------- arrays

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """(T,) float32."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n).astype(np.float32)
        else:  # scaled_linear: linear in sqrt(beta), squared in float32
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n).astype(np.float32) ** 2
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        betas.setflags(write=False)
        return betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t, (T,) float32. ``alphas_cumprod[-1] == 0`` exactly with ``rescale_betas_zero_snr``."""
        out = _cumprod((np.float32(1.0) - self.betas).astype(np.float32))
        out.setflags(write=False)
        return out

    @property
    def final_alpha_cumprod(self) -> np.float32:
        """ᾱ used for the step past t = 0: 1 with ``set_alpha_to_one``, else ᾱ_0."""
        return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def inference_timesteps(self, num_steps: int) -> np.ndarray:
        """The descending timesteps of ``DDIMScheduler.set_timesteps(num_steps)``, int64 (num_steps,).

        * ``leading``:  ``arange(N) * (T // N)`` reversed, plus ``steps_offset``;
        * ``trailing``: ``round(arange(T, 0, -T / N)) - 1`` (``steps_offset`` is ignored, as in diffusers);
        * ``linspace``: ``round(linspace(0, T - 1, N))`` reversed (``steps_offset`` ignored).
        """
        T = self.num_train_timesteps
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if num_steps > T:
            raise ValueError(
                f"num_steps={num_steps} cannot be larger than num_train_timesteps={T}: the model was trained "
                f"on at most {T} timesteps"
            )
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64)
            ts += self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        return np.ascontiguousarray(ts)


def moore_inference_schedule(**overrides) -> NoiseSchedule:
    """Moore-AnimateAnyone inference (``configs/inference/inference_v2.yaml``): linear betas, zero-SNR,
    v-prediction, trailing spacing, ``steps_offset`` 1, ``set_alpha_to_one``, no clipping."""
    kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
        set_alpha_to_one=True,
        clip_sample=False,
    )
    kwargs.update(overrides)
    return NoiseSchedule(**kwargs)


def moore_training_schedule(**overrides) -> NoiseSchedule:
    """Moore-AnimateAnyone training (both stages): as inference but **scaled_linear** betas (the
    training scripts force ``beta_schedule="scaled_linear"`` after enabling zero-SNR)."""
    return moore_inference_schedule(**{"beta_schedule": "scaled_linear", **overrides})
