"""An exact, parameter-free stand-in for the SD VAE: pixel (un)shuffle.

``encode`` folds each ``factor x factor`` pixel block into channels (3 -> 3*factor^2 latent
channels at 1/factor resolution) and ``decode`` unfolds them, so decode(encode(x)) == x exactly.
The built-in demo uses it (configs select it) so that a CPU can train the real UNets in minutes
without a pretrained VAE; it has the AutoencoderKL interface the pipeline and trainer use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class PixelAutoencoderConfig:
    kind: str = "pixel_unshuffle"
    factor: int = 4
    in_channels: int = 3
    scaling_factor: float = 1.0

    def __post_init__(self):
        if self.kind != "pixel_unshuffle":
            raise ValueError(f"PixelAutoencoderConfig.kind must be 'pixel_unshuffle', got {self.kind!r}")
        if self.factor < 1:
            raise ValueError(f"PixelAutoencoderConfig.factor must be >= 1, got {self.factor}")

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.factor**2

    @property
    def downscale(self) -> int:
        return self.factor


class PixelAutoencoder(nnx.Module):
    def __init__(self, config: PixelAutoencoderConfig, *, dtype=None, rngs: nnx.Rngs | None = None, **_):
        self.config = config

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(..., H, W, C) in [-1, 1] -> (mean, logvar) with mean (..., H/f, W/f, C*f*f); the
        posterior is a point mass (logvar = -inf), so ``sample`` returns the mean exactly."""
        f = self.config.factor
        *lead, h, w, c = x.shape
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the pixel autoencoder factor {f}")
        z = x.reshape(*lead, h // f, f, w // f, f, c)
        z = jnp.moveaxis(z, -4, -3).reshape(*lead, h // f, w // f, f * f * c)
        return z, jnp.full_like(z, -jnp.inf)

    @staticmethod
    def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, z: jax.Array) -> jax.Array:
        f, c = self.config.factor, self.config.in_channels
        *lead, h, w, _ = z.shape
        x = z.reshape(*lead, h, w, f, f, c)
        return jnp.moveaxis(x, -3, -4).reshape(*lead, h * f, w * f, c)
