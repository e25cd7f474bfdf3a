"""The settings a weights directory was made for (its "native" settings), recorded in ``anim_jax.json``.

``anim-jax convert`` records Moore-AnimateAnyone's inference settings (512x768, 25 DDIM steps, guidance
3.5, 24-frame context windows); a training export records its training resolution and clip length and
the steps and guidance its validation used. ``anim-jax animate`` and ``AnimatePipeline`` use them
wherever the caller gives no value; a directory written before they were recorded reads as Moore's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

KEY = "native"


@dataclasses.dataclass(frozen=True)
class NativeSettings:
    width: int
    height: int
    steps: int
    guidance_scale: float
    context_frames: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MOORE = NativeSettings(width=512, height=768, steps=25, guidance_scale=3.5, context_frames=24)


def from_config(config: Mapping[str, Any]) -> NativeSettings:
    """The ``native`` entry of a directory's ``anim_jax.json``; fields it lacks are Moore's."""
    recorded = config.get(KEY) or {}
    if not isinstance(recorded, Mapping):
        raise ValueError(f"the {KEY!r} entry of anim_jax.json must be an object, got {type(recorded).__name__}")
    fields = {f.name for f in dataclasses.fields(NativeSettings)}
    values = MOORE.to_json()
    for name, value in recorded.items():
        if name in fields:
            values[name] = float(value) if name == "guidance_scale" else int(value)
    return NativeSettings(**values)


def from_training_config(cfg) -> NativeSettings:
    """What a training run's export is native to: the training resolution and clip length (a stage-1,
    single-frame run keeps Moore's 24-frame windows) and its validation's steps and guidance."""
    data = cfg.get("data", {}) if hasattr(cfg, "get") else {}
    validation = cfg.get("validation", {}) if hasattr(cfg, "get") else {}
    height, width = data.get("resolution", (MOORE.height, MOORE.width))
    n_frames = int(data.get("n_frames", 1) or 1)
    return NativeSettings(
        width=int(width),
        height=int(height),
        steps=int(validation.get("num_inference_steps", MOORE.steps)),
        guidance_scale=float(validation.get("guidance_scale", MOORE.guidance_scale)),
        context_frames=n_frames if n_frames > 1 else MOORE.context_frames,
    )
