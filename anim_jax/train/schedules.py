"""The noise schedules of a training config: training, validation and the one an export records."""

from __future__ import annotations

from anim_jax.diffusion import NoiseSchedule, moore_inference_schedule, moore_training_schedule

def _diffusion_field(cfg, name: str, default: str) -> str:
    d = cfg.get("diffusion", None) if cfg is not None else None
    return str(d.get(name, default)) if d is not None else default


def training_schedule(cfg=None) -> NoiseSchedule:
    """Moore's training schedule with ``cfg.diffusion``'s prediction type and betas."""
    return moore_training_schedule(prediction_type=_diffusion_field(cfg, "prediction_type", "v_prediction"),
                                   beta_schedule=_diffusion_field(cfg, "beta_schedule", "scaled_linear"))


def export_schedule(cfg=None) -> NoiseSchedule:
    """The inference schedule an export records (``cfg.diffusion.export_beta_schedule``)."""
    return validation_schedule(_diffusion_field(cfg, "export_beta_schedule", "linear"), cfg)


def validation_schedule(beta_schedule: str = "linear", cfg=None) -> NoiseSchedule:
    """Moore's inference schedule with these betas and ``cfg.diffusion``'s prediction type."""
    return moore_inference_schedule(beta_schedule=beta_schedule,
                                    prediction_type=_diffusion_field(cfg, "prediction_type", "v_prediction"))
