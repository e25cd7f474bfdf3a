"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax NNX, channels-last.

Module and attribute names mirror diffusers, so the NNX parameter paths are the diffusers state-dict
keys (see ``anim_jax.convert.vae_keys``). Only the blocks the SD VAEs use are implemented
(``DownEncoderBlock2D`` / ``UpDecoderBlock2D``, GroupNorm, SiLU); anything else in a config is a
clear error rather than a silently different model.

Layouts: images (..., H, W, 3) in [-1, 1]; latents (..., H/2^(n-1), W/2^(n-1), latent_channels).
Any leading axes (e.g. a video's (B, F)) are folded into the batch, so every frame is encoded or
decoded independently with per-image GroupNorm statistics, as the PyTorch original does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.attention_ops import AttentionConfig, dot_product_attention
from anim_jax.models.layers import Conv2d, Dtype, GroupNorm, Linear, upsample_nearest

_EPS = 1e-6  # every VAE norm (resnets, mid-block attention, conv_norm_out) uses eps 1e-6



@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKL``. The defaults are ``stabilityai/sd-vae-ft-mse``."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.block_out_channels) - 1)



class _Common:
    """Keyword arguments every VAE submodule passes down."""

    def __init__(self, groups: int, dtype, param_dtype, attention: AttentionConfig | None, rngs: nnx.Rngs):
        self.groups, self.dtype, self.param_dtype = groups, dtype, param_dtype
        self.attention, self.rngs = attention, rngs

    def conv(self, cin: int, cout: int, k: int = 3, **kw) -> Conv2d:
        return Conv2d(cin, cout, k, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs, **kw)

    def norm(self, c: int) -> GroupNorm:
        return GroupNorm(self.groups, c, eps=_EPS, param_dtype=self.param_dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding: norm-SiLU-conv twice plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, c: _Common):
        self.norm1 = c.norm(in_channels)
        self.conv1 = c.conv(in_channels, out_channels)
        self.norm2 = c.norm(out_channels)
        self.conv2 = c.conv(out_channels, out_channels)
        self.conv_shortcut = c.conv(in_channels, out_channels, 1, padding=0) if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """The mid-block spatial self-attention: GroupNorm, one head over all channels, residual."""

    def __init__(self, channels: int, c: _Common):
        self.group_norm = c.norm(channels)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=c.rngs)
        self.to_q = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_k = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_v = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_out = Linear(channels, channels, axes=("heads", "embed"), **kw)  # diffusers: to_out.0
        self.attention = c.attention

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, ch = x.shape
        t = self.group_norm(x).reshape(n, h * w, 1, ch)
        o = dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t), self.attention)
        return x + self.to_out(o).reshape(n, h, w, ch).astype(x.dtype)


class Downsample2D(nnx.Module):
    """diffusers ``Downsample2D(padding=0)``: zero-pad right and bottom by one, then a stride-2 conv."""

    def __init__(self, channels: int, c: _Common):
        self.conv = c.conv(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    """Nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, channels: int, c: _Common):
        self.conv = c.conv(channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest(x))


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, c: _Common):
        self.resnets = nnx.List(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, c) for i in range(num_layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(out_channels, c)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool, c: _Common):
        self.resnets = nnx.List(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, c) for i in range(num_layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, c)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers or ():
            x = up(x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet -> (attention) -> resnet, as diffusers' ``UNetMidBlock2D(num_layers=1)``."""

    def __init__(self, channels: int, add_attention: bool, c: _Common):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, c) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, c)]) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, config: VAEConfig, c: _Common):
        ch = config.block_out_channels
        self.conv_in = c.conv(config.in_channels, ch[0])
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block, i < len(ch) - 1, c)
                for i in range(len(ch))
            ]
        )
        self.mid_block = UNetMidBlock2D(ch[-1], config.mid_block_add_attention, c)
        self.conv_norm_out = c.norm(ch[-1])
        self.conv_out = c.conv(ch[-1], 2 * config.latent_channels)  # mean and logvar ("double_z")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, config: VAEConfig, c: _Common):
        rev = tuple(reversed(config.block_out_channels))
        self.conv_in = c.conv(config.latent_channels, rev[0])
        self.mid_block = UNetMidBlock2D(rev[0], config.mid_block_add_attention, c)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, i < len(rev) - 1, c)
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = c.norm(rev[-1])
        self.conv_out = c.conv(rev[-1], config.out_channels)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _fold(fn, x: jax.Array) -> jax.Array:
    """Apply ``fn`` to (N, H, W, C) with every leading axis of ``x`` folded into N."""
    lead = x.shape[:-3]
    y = fn(x.reshape((-1,) + x.shape[-3:]))
    return y.reshape(lead + y.shape[1:])


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL`` (the SD VAE); see the module docstring for layouts."""

    def __init__(
        self,
        config: VAEConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        attention: AttentionConfig | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        c = _Common(config.norm_num_groups, dtype, param_dtype, attention, rngs)
        lc = config.latent_channels
        self.encoder = Encoder(config, c)
        self.decoder = Decoder(config, c)
        self.quant_conv = c.conv(2 * lc, 2 * lc, 1, padding=0) if config.use_quant_conv else None
        self.post_quant_conv = c.conv(lc, lc, 1, padding=0) if config.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (..., H, W, in_channels) in [-1, 1] -> ``(mean, logvar)`` of the latent Gaussian
        (un-scaled; multiply samples by ``config.scaling_factor`` for the diffusion model).
        ``logvar`` is clipped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution`` does."""

        def enc(x):
            h = self.encoder(x)
            return self.quant_conv(h) if self.quant_conv is not None else h

        moments = _fold(enc, x)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    @staticmethod
    def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        """A draw ``mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` from ``key``."""
        eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
        return mean + jnp.exp(0.5 * logvar) * eps

    def decode(self, z: jax.Array) -> jax.Array:
        """Un-scaled latents (..., h, w, latent_channels) -> images (..., h*s, w*s, out_channels),
        nominally in [-1, 1] (not clipped)."""

        def dec(z):
            if self.post_quant_conv is not None:
                z = self.post_quant_conv(z)
            return self.decoder(z)

        return _fold(dec, z)
