"""CLIP image encoder (transformers ``CLIPVisionModelWithProjection``) in Flax NNX, channels-last.

Attribute names mirror transformers (including its ``pre_layrnorm`` spelling), so the NNX parameter
paths are the transformers state-dict keys (see ``anim_jax.convert.clip_keys``).

AnimateAnyone uses only ``image_embeds``: the projected, *un-normalised* pooled CLS token, one
768-d cross-attention token per reference image. ``clip_preprocess`` reproduces the inference-time
preprocessing of Moore-AnimateAnyone (squash-resize to 224x224, then ``CLIPImageProcessor``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from anim_jax.models.attention_ops import AttentionConfig, dot_product_attention
from anim_jax.models.layers import Conv2d, Dtype, LayerNorm, Linear, param

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of the vision tower. The defaults are ViT-L/14 of ``sd-image-variations-diffusers``."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIP vision config: hidden_act = {self.hidden_act!r} is not supported (one of {sorted(_ACTIVATIONS)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP vision config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIP vision config: image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1



class Embedding(nnx.Module):
    """A lookup table; its parameter ``embedding`` maps to PyTorch's ``weight``."""

    def __init__(self, num: int, dim: int, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.embedding = param(rngs.params(), jax.nn.initializers.normal(1.0), (num, dim), param_dtype, (None, "embed"))


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.image_size = config.image_size
        self.class_embedding = param(rngs.params(), jax.nn.initializers.normal(1.0), (d,), param_dtype, ("embed",))
        self.patch_embedding = Conv2d(
            config.num_channels,
            d,
            config.patch_size,
            stride=config.patch_size,
            padding=0,
            use_bias=False,
            axes=(None, None, None, "embed"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.position_embedding = Embedding(config.num_positions, d, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP expects {self.image_size}x{self.image_size} images, got {h}x{w}")
        patches = self.patch_embedding(pixel_values)  # (B, h/p, w/p, D), row-major like torch's flatten(2)
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, attention, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = config.num_attention_heads
        self.k_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.q_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), **kw)
        self.attention = attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads)

        o = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), self.attention)
        return self.out_proj(o.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = config.hidden_act
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, attention, rngs: nnx.Rngs):
        eps, d = config.layer_norm_eps, config.hidden_size
        self.self_attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)
        self.layer_norm1 = LayerNorm(d, eps=eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, eps=eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, attention, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, attention, rngs: nnx.Rngs):
        eps, d = config.layer_norm_eps, config.hidden_size
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(d, eps=eps, param_dtype=param_dtype)  # (sic) transformers' name
        self.encoder = CLIPEncoder(config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)
        self.post_layernorm = LayerNorm(d, eps=eps, param_dtype=param_dtype)


class CLIPVisionOutput(NamedTuple):
    image_embeds: jax.Array  # (B, projection_dim): visual_projection(pooler_output)
    last_hidden_state: jax.Array  # (B, 1 + num_patches, hidden): encoder output, before post_layernorm
    pooler_output: jax.Array  # (B, hidden): post_layernorm(CLS token)


class CLIPVisionModelWithProjection(nnx.Module):
    """``model(pixel_values)`` -> ``image_embeds``; ``model.encode(pixel_values)`` -> all outputs.

    ``pixel_values``: (B, image_size, image_size, 3), normalised as ``clip_preprocess`` does.
    """

    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        attention: AttentionConfig | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.vision_model = CLIPVisionTransformer(
            config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs
        )
        self.visual_projection = Linear(
            config.hidden_size,
            config.projection_dim,
            use_bias=False,
            axes=("embed", None),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def encode(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        last = vm.encoder(x)
        pooled = vm.post_layernorm(last[:, 0])
        return CLIPVisionOutput(self.visual_projection(pooled), last, pooled)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.encode(pixel_values).image_embeds


def clip_resize(images, image_size: int = 224) -> np.ndarray:
    """Moore-AnimateAnyone's CLIP input resize, on the host -> uint8 (B, S, S, 3).

    ``images``: a PIL image, a sequence of PIL images, or uint8 arrays (H, W, 3) / (B, H, W, 3).
    Each image is converted to RGB and squash-resized (no crop, aspect ratio not kept) to
    ``image_size`` x ``image_size`` with PIL bicubic, as ``ref_image_pil.resize((224, 224))`` does.
    ``CLIPImageProcessor``'s shortest-edge resize and centre crop are then no-ops.
    """
    if isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"clip_preprocess expects uint8 images, got {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"clip_preprocess expects (H, W, 3) or (B, H, W, 3) images, got {images.shape}")
        images = [Image.fromarray(im) for im in images]
    out = [np.asarray(im.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC), np.uint8)
           for im in images]
    return np.stack(out)


def clip_normalize(pixels, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD):
    """uint8 (or 0..255 float) pixels -> the encoder's input ``(x / 255 - mean) / std``, float32.
    Works on numpy and JAX arrays alike (the one place the normalisation is written)."""
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_preprocess(
    images,
    image_size: int = 224,
    *,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """Moore-AnimateAnyone's inference preprocessing -> float32 (B, S, S, 3) pixel values:
    ``clip_resize`` then ``clip_normalize``, on the host."""
    return np.asarray(clip_normalize(clip_resize(images, image_size), mean, std), np.float32)
