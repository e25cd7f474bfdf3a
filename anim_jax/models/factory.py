"""Building the five Animate Anyone components from their architectures as plain JSON.

Each component's configuration is its dataclass's fields as JSON (what a converted-weights
directory's ``anim_jax.json`` holds, :mod:`anim_jax.weights_dir`). ``build(..., abstract=True)``
creates a module's shapes only (``nnx.eval_shape``: no random initialisation of ~2 GB of weights),
for :mod:`anim_jax.convert.components` to fill from the safetensors files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.attention_ops import AttentionConfig
from anim_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from anim_jax.models.motion import MotionConfig
from anim_jax.models.pixel_autoencoder import PixelAutoencoder, PixelAutoencoderConfig
from anim_jax.models.pose_guider import PoseGuider
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig
from anim_jax.models.vae import AutoencoderKL, VAEConfig

COMPONENTS = ("denoiser", "reference_net", "pose_guider", "vae", "image_encoder")


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def to_json(config) -> Any:
    """A config dataclass (possibly nested) as JSON-ready data."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_json(v) for v in config]
    return config


def _dataclass_from_json(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    return cls(**_tuples(data))


def unet_config_from_json(data: dict, where: str = "unet") -> UNetConfig:
    data = dict(data)
    motion = data.get("motion")
    if motion is not None:
        data["motion"] = _dataclass_from_json(MotionConfig, motion, f"{where}.motion")
    return _dataclass_from_json(UNetConfig, data, where)


@dataclasses.dataclass(frozen=True)
class PoseGuiderConfig:
    conditioning_embedding_channels: int = 320
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)


class _ShapeOnlyRngs:
    """``nnx.Rngs`` for abstract builds. Every module draws its initial values with ``rngs.params()``;
    under ``nnx.eval_shape`` the draws are never computed, but each ``nnx.Rngs`` call updates a traced
    counter, and flax inspects that counter's ever longer chain of updates on every call: tracing
    becomes quadratic in the number of parameters (12 s instead of 1.4 s for an SD1.5 UNet3D)."""

    def params(self):
        return jax.random.key(0)


def build(component: str, config: dict, *, dtype=jnp.float32, attention: AttentionConfig | None = None,
          abstract: bool = False, seed: int = 0):
    """One component from its JSON config; ``abstract`` gives shapes only (to be filled by loading)."""
    attention = attention or AttentionConfig()

    def make():
        rngs = _ShapeOnlyRngs() if abstract else nnx.Rngs(seed)
        if component in ("denoiser", "reference_net"):
            return UNet2DConditionModel(
                unet_config_from_json(config, component), reference_net=component == "reference_net",
                dtype=dtype, attention=attention, rngs=rngs,
            )
        if component == "pose_guider":
            c = _dataclass_from_json(PoseGuiderConfig, config, component)
            return PoseGuider(c.conditioning_embedding_channels, c.block_out_channels, dtype=dtype, rngs=rngs)
        if component == "vae" and config.get("kind") == "pixel_unshuffle":
            return PixelAutoencoder(_dataclass_from_json(PixelAutoencoderConfig, config, component))
        if component == "vae":
            return AutoencoderKL(_dataclass_from_json(VAEConfig, config, component), dtype=dtype,
                                 attention=attention, rngs=rngs)
        if component == "image_encoder":
            return CLIPVisionModelWithProjection(_dataclass_from_json(CLIPVisionConfig, config, component),
                                                 dtype=dtype, attention=attention, rngs=rngs)
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")

    return nnx.eval_shape(make) if abstract else make()


def component_config(name: str, module) -> dict:
    if name == "pose_guider":
        return to_json(PoseGuiderConfig(module.conv_out.kernel.shape[-1],
                                        tuple([module.conv_in.kernel.shape[-1]] +
                                              [b.kernel.shape[-1] for b in module.blocks[1::2]])))
    return to_json(module.config)
