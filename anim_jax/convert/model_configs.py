"""Model configurations from the original checkpoints' own config files and state dicts.

The dataclasses in ``anim_jax.models`` describe architectures and know no file format; reading
diffusers / transformers ``config.json`` files, Moore/AnimateDiff yaml kwargs and a motion-module
state dict's key layout happens here. Each reader refuses an option this port does not implement,
naming it, rather than build a silently different model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from anim_jax.convert import motion_keys
from anim_jax.models.clip import CLIPVisionConfig
from anim_jax.models.motion import MotionConfig
from anim_jax.models.unet import UNetConfig
from anim_jax.models.vae import VAEConfig

__all__ = [
    "clip_config_from_transformers",
    "motion_config_from_moore_yaml",
    "motion_config_from_state_dict_shapes",
    "unet_config_from_diffusers",
    "vae_config_from_diffusers",
]

# ------------------------------------------------------------------------------------------------
# UNet (diffusers UNet2DConditionModel config.json)

def unet_config_from_diffusers(config: Mapping[str, Any], **overrides) -> UNetConfig:
    """Reads a diffusers ``UNet2DConditionModel`` config (the parsed ``unet/config.json``, or
    ``model.config``). ``overrides`` set fields (e.g. ``groupnorm_over_frames=True``).

    Every option this port does not implement must hold its diffusers default, otherwise a
    ValueError names the field. Keys starting with ``_`` and ``sample_size`` /
    ``upcast_attention`` (our softmax is always float32) are ignored; keys we do not know are
    ignored when None or False (options that are off) and refused otherwise. The motion modules
    are not part of a diffusers 2-D config: pass ``motion=MotionConfig(...)`` for a UNet3D.
    """
    config = dict(config)
    bad = []
    for key, default in _DIFFUSERS_FIXED.items():
        if key in config:
            value = config.pop(key)
            if key in _NONE_IS_FALSE:  # None / False / a per-block list of False all mean "off"
                value = any(value) if isinstance(value, (list, tuple)) else bool(value)
            if value != default:
                bad.append(f"{key}={value!r} (only {default!r} is supported)")
    for key in _DIFFUSERS_IGNORED:
        config.pop(key, None)
    kwargs = {}
    for key, field in _DIFFUSERS_FIELDS.items():
        if key not in config:
            continue
        value = config.pop(key)
        if key in _INT_ONLY and not isinstance(value, int):
            bad.append(f"{key}={value!r} (only a single int is supported)")
            continue
        kwargs[field] = tuple(value) if isinstance(value, list) else value
    for key, value in config.items():
        if not key.startswith("_") and value not in (None, False):
            bad.append(f"{key}={value!r} (unknown option)")
    if bad:
        raise ValueError("unsupported UNet config: " + "; ".join(bad))
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


# diffusers config key -> UNetConfig field
_DIFFUSERS_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "block_out_channels": "block_out_channels",
    "down_block_types": "down_block_types",
    "up_block_types": "up_block_types",
    "layers_per_block": "layers_per_block",
    "attention_head_dim": "num_attention_heads",  # legacy meaning: the number of heads
    "cross_attention_dim": "cross_attention_dim",
    "norm_num_groups": "norm_num_groups",
    "norm_eps": "norm_eps",
    "use_linear_projection": "use_linear_projection",
    "flip_sin_to_cos": "flip_sin_to_cos",
    "freq_shift": "freq_shift",
    "transformer_layers_per_block": "transformer_layers_per_block",
}
_INT_ONLY = ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "norm_num_groups")
_NONE_IS_FALSE = ("only_cross_attention", "mid_block_only_cross_attention")
_DIFFUSERS_IGNORED = ("sample_size", "upcast_attention", "addition_embed_type_num_heads")
# Options that must keep their diffusers default (the only behaviour implemented here).
_DIFFUSERS_FIXED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "center_input_sample": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": False,
    "dual_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
}


# ------------------------------------------------------------------------------------------------
# VAE (diffusers AutoencoderKL config.json)

# diffusers AutoencoderKL.__init__ defaults: what from_pretrained uses for a key absent from config.json.
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def vae_config_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
    """From a diffusers ``config.json`` dict; absent keys take diffusers' defaults, unknown keys
    (``_class_name``, ``sample_size``, ``force_upcast``, ...) are ignored."""
    c = {**_DIFFUSERS_DEFAULTS, **config}
    n = len(c["block_out_channels"])
    for field, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(c[field])
        if len(types) != n:
            raise ValueError(
                f"VAE config: {field} has {len(types)} entries but block_out_channels has {n}"
            )
        for i, t in enumerate(types):
            if t != allowed:
                raise ValueError(f"VAE config: {field}[{i}] = {t!r} is not supported (only {allowed!r})")
    if c["act_fn"] != "silu":
        raise ValueError(f"VAE config: act_fn = {c['act_fn']!r} is not supported (only 'silu')")
    return VAEConfig(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        latent_channels=int(c["latent_channels"]),
        block_out_channels=tuple(int(b) for b in c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]),
        norm_num_groups=int(c["norm_num_groups"]),
        scaling_factor=float(c["scaling_factor"]),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]),
    )


# ------------------------------------------------------------------------------------------------
# CLIP image encoder (transformers CLIPVisionConfig)

# transformers CLIPVisionConfig defaults (ViT-B/32): what from_pretrained uses for an absent key.
_TRANSFORMERS_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    projection_dim=512,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)


def clip_config_from_transformers(config: Mapping[str, Any]) -> CLIPVisionConfig:
    """From a transformers ``CLIPVisionConfig`` dict (``config.json`` of an image encoder), or a full
    ``CLIPConfig`` dict (its ``vision_config`` is used). Absent keys take transformers' defaults;
    unrelated keys (dropout, initializer, ``architectures``, ...) are ignored."""
    if "vision_config" in config:
        config = config["vision_config"] or {}
    c = {**_TRANSFORMERS_DEFAULTS, **config}
    return CLIPVisionConfig(**{f.name: c[f.name] for f in dataclasses.fields(CLIPVisionConfig)})


# ------------------------------------------------------------------------------------------------
# AnimateDiff / Moore motion modules


def motion_config_from_moore_yaml(kwargs: Mapping[str, Any]) -> MotionConfig:
    """From Moore/AnimateDiff yaml: either ``unet_additional_kwargs`` (placement + the nested
    ``motion_module_kwargs``) or the ``motion_module_kwargs`` dict alone (default placement).

    Unknown motion-module keys and unsupported values are a ValueError naming the key.
    """
    kwargs = dict(kwargs)
    placement: dict[str, Any] = {}
    if "motion_module_kwargs" in kwargs:
        if not kwargs.get("use_motion_module", True):
            raise ValueError("unet_additional_kwargs.use_motion_module is false: there is no motion module")
        mtype = kwargs.get("motion_module_type", "Vanilla")
        if mtype != "Vanilla":
            raise ValueError(f"unet_additional_kwargs.motion_module_type={mtype!r}: only 'Vanilla' is supported")
        if "motion_module_resolutions" in kwargs:
            levels = []
            for r in kwargs["motion_module_resolutions"]:
                lvl = int(round(math.log2(r))) if r > 0 else -1
                if r <= 0 or 2**lvl != r:
                    raise ValueError(
                        f"unet_additional_kwargs.motion_module_resolutions: {r} is not a power of two"
                    )
                levels.append(lvl)
            placement["levels"] = tuple(sorted(levels))
        if "motion_module_mid_block" in kwargs:
            placement["use_mid_block"] = bool(kwargs["motion_module_mid_block"])
        if "motion_module_decoder_only" in kwargs:
            placement["decoder_only"] = bool(kwargs["motion_module_decoder_only"])
        kwargs = dict(kwargs["motion_module_kwargs"] or {})
    known = {
        "num_attention_heads", "num_transformer_block", "attention_block_types",
        "temporal_position_encoding", "temporal_position_encoding_max_len",
        "temporal_attention_dim_div", "zero_initialize", "norm_num_groups",
    }  # fmt: skip
    if kwargs.get("cross_frame_attention_mode") is not None:
        raise ValueError(
            f"motion_module_kwargs.cross_frame_attention_mode={kwargs['cross_frame_attention_mode']!r}: "
            "cross-frame attention is not supported (only None)"
        )
    kwargs.pop("cross_frame_attention_mode", None)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"motion_module_kwargs: unsupported keys {unknown}")
    return MotionConfig(**kwargs, **placement)


def motion_config_from_state_dict_shapes(shapes: Mapping[str, tuple[int, ...]], **overrides) -> MotionConfig:
    """Infers the layout from a checkpoint's ``{key: shape}`` (original or diffusers keys; a
    motion-module file, a diffusers adapter or a whole UNet).

    Inferred: ``temporal_position_encoding_max_len`` (from the ``pe`` buffers; if the checkpoint
    has none, the default is kept), ``num_transformer_block``, the number of attention blocks,
    ``use_mid_block`` and ``levels``. Not inferable (every shape is the same for any value):
    ``num_attention_heads`` (default 8, AnimateDiff's) and ``norm_num_groups`` (default 32) —
    pass them in ``overrides`` when they differ.
    """
    prefixes = motion_keys.motion_module_prefixes(shapes)
    if not prefixes:
        raise ValueError("state dict has no motion-module keys (no '...motion_modules.<j>.' prefix)")
    blocks: dict[str, set[int]] = {p: set() for p in prefixes}
    attn: dict[str, set[int]] = {p: set() for p in prefixes}
    max_lens: dict[str, int] = {}
    for key, shape in shapes.items():
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            continue
        rest = key[len(prefix) + 1 :].removeprefix("temporal_transformer.")
        parts = rest.split(".")
        if parts[0] == "transformer_blocks":
            blocks[prefix].add(int(parts[1]))
            if parts[2] == "attention_blocks":
                attn[prefix].add(int(parts[3]))
            elif parts[2].startswith("attn"):
                attn[prefix].add(int(parts[2][4:]) - 1)
        if key.endswith(("pos_encoder.pe", "pos_embed.pe")):
            max_lens[key] = int(tuple(shape)[1])

    def one(name, per_prefix):
        values = set(per_prefix.values())
        if len(values) != 1:
            raise ValueError(f"motion modules disagree on {name}: {per_prefix}")
        return values.pop()

    n_blocks = one("the number of transformer blocks", {p: len(v) for p, v in blocks.items()})
    n_attn = one("the number of attention blocks", {p: len(v) for p, v in attn.items()})
    inferred: dict[str, Any] = {
        "num_transformer_block": n_blocks,
        "attention_block_types": ("Temporal_Self",) * n_attn,
        "use_mid_block": any(p.startswith("mid_block.") for p in prefixes),
    }
    if max_lens:
        inferred["temporal_position_encoding_max_len"] = one("the positional-encoding length", max_lens)
    down = sorted({int(p.split(".")[1]) for p in prefixes if p.startswith("down_blocks.")})
    up = sorted({int(p.split(".")[1]) for p in prefixes if p.startswith("up_blocks.")})
    if down:
        n_levels = max(down + up) + 1
        if up and sorted(n_levels - 1 - j for j in up) != down:
            raise ValueError(f"motion modules in down levels {down} but up blocks {up}: not a mirrored layout")
        inferred["levels"] = tuple(down)
    inferred.update(overrides)
    return MotionConfig(**inferred)
