"""From a training config to the model's architecture: each component's config, checked for
consistency, and the randomly (or abstractly) initialised ``AnimateAnyone``."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from anim_jax.models import factory
from anim_jax.models.animate_anyone import COMPONENTS, AnimateAnyone
from anim_jax.models.attention_ops import AttentionConfig

def plain(value):
    """ConfigDicts / tuples -> JSON-like dicts / lists (what ``factory.build`` reads)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def attention_config(cfg) -> AttentionConfig:
    m = cfg.model
    return AttentionConfig(m.attention, query_chunk_size=int(m.get("query_chunk_size", 1024)))


def compute_dtype(cfg):
    return jnp.dtype(cfg.model.compute_dtype)


def component_configs(cfg) -> dict[str, dict]:
    """Each component's architecture (JSON dicts as ``factory.build`` takes): from the converted
    weights directory ``cfg.init.weights_dir`` where it has the component, else from
    ``cfg.model.components``; the ReferenceNet shares the denoiser's UNet config. The denoiser gets
    ``cfg.model.motion`` (motion modules; None, as in stage 1: a 2-D denoiser) and
    ``cfg.model.groupnorm_over_frames``."""
    from anim_jax.convert import store

    given = plain(cfg.model.components)
    stored: dict[str, Any] = {}
    weights_dir = cfg.init.get("weights_dir", "")
    if weights_dir:
        stored = store.read_config(weights_dir)
    out: dict[str, dict] = {}
    for name in COMPONENTS:
        if name in stored:
            out[name] = dict(stored[name])
    unet = out.get("denoiser") or out.get("reference_net") or given.get("unet")
    if unet is None:
        raise ValueError("no UNet architecture: set config.model.components.unet or config.init.weights_dir")
    out.setdefault("denoiser", dict(unet))
    out.setdefault("reference_net", dict(unet))
    for name, key in (("pose_guider", "pose_guider"), ("vae", "vae"), ("image_encoder", "image_encoder")):
        if name not in out:
            if key not in given:
                raise ValueError(f"no {name} architecture: set config.model.components.{key} or config.init.weights_dir")
            out[name] = dict(given[key])
    for name in ("denoiser", "reference_net"):
        out[name]["groupnorm_over_frames"] = bool(cfg.model.get("groupnorm_over_frames", False))
        out[name]["motion"] = None
    motion = plain(cfg.model.get("motion"))
    if motion:
        out["denoiser"]["motion"] = dict(motion)
    _check_geometry(out, cfg)
    return out


def _check_geometry(configs: Mapping[str, dict], cfg) -> None:
    unet_ch = tuple(configs["denoiser"]["block_out_channels"])
    pg = configs["pose_guider"]
    pg_channels = pg.get("conditioning_embedding_channels", 320)
    if pg_channels != unet_ch[0]:
        raise ValueError(f"pose_guider.conditioning_embedding_channels {pg_channels} != the UNet's first width {unet_ch[0]}")
    ctx = configs["image_encoder"].get("projection_dim", 768)
    if ctx != configs["denoiser"].get("cross_attention_dim", 1280):
        raise ValueError(
            f"image_encoder.projection_dim {ctx} != the UNet's cross_attention_dim {configs['denoiser'].get('cross_attention_dim')}"
        )
    vae = configs["vae"]
    if vae.get("kind") == "pixel_unshuffle":
        vae_down = int(vae.get("factor", 4))
        latent_channels = int(vae.get("in_channels", 3)) * vae_down**2
    else:
        vae_down = 2 ** (len(vae.get("block_out_channels", (128, 256, 512, 512))) - 1)
        latent_channels = int(vae.get("latent_channels", 4))
    for key in ("in_channels", "out_channels"):
        if int(configs["denoiser"].get(key, 4)) != latent_channels:
            raise ValueError(f"the UNet's {key} {configs['denoiser'].get(key, 4)} != the autoencoder's {latent_channels} latent channels")
    data = cfg.get("data")
    if data is None:
        return
    pg_down = 2 ** (len(pg.get("block_out_channels", (16, 32, 96, 256))) - 1)
    if vae_down != pg_down:
        raise ValueError(f"the VAE downsamples by {vae_down} but the PoseGuider by {pg_down}")
    unet_down = 2 ** (len(unet_ch) - 1)
    for side in tuple(data.resolution):
        if side % (vae_down * unet_down):
            raise ValueError(
                f"config.data.resolution {tuple(data.resolution)}: each side must be a multiple of "
                f"{vae_down * unet_down} (VAE x UNet downsampling)"
            )
    clip_size = configs["image_encoder"].get("image_size", 224)
    if int(data.clip_size) != clip_size:
        raise ValueError(f"config.data.clip_size {data.clip_size} != the image encoder's image_size {clip_size}")


def build_model(cfg, *, abstract: bool = False, seed: int | None = None) -> AnimateAnyone:
    """The bundle from ``component_configs`` with random (or, ``abstract``, shape-only) parameters.
    Trained components compute in ``cfg.model.compute_dtype``, frozen encoders too."""
    configs = component_configs(cfg)
    kw = dict(dtype=compute_dtype(cfg), attention=attention_config(cfg), abstract=abstract)
    seed = int(cfg.seed if seed is None else seed)
    mods = {name: factory.build(name, configs[name], seed=seed + i, **kw) for i, name in enumerate(COMPONENTS)}
    return AnimateAnyone(**mods)
