import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from anim_jax.models.pixel_autoencoder import PixelAutoencoder, PixelAutoencoderConfig


def test_round_trip_is_exact_and_matches_torch_pixel_unshuffle_layout():
    ae = PixelAutoencoder(PixelAutoencoderConfig(factor=2))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 6, 3)).astype(np.float32)  # a video
    mean, logvar = ae.encode(jnp.asarray(x))
    assert mean.shape == (2, 3, 4, 3, 12)
    np.testing.assert_array_equal(np.asarray(ae.decode(mean)), x)
    np.testing.assert_array_equal(np.asarray(ae.sample(mean, logvar, jax.random.key(0))), np.asarray(mean))
    # Same neighbourhood grouping as torch's pixel_unshuffle (channel order differs: ours is (fy, fx, c)).
    t = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x[0, 0]).permute(2, 0, 1)[None], 2)[0]  # (12, 4, 3)
    ours = np.asarray(mean[0, 0]).reshape(4, 3, 2, 2, 3).transpose(4, 2, 3, 0, 1).reshape(12, 4, 3)
    np.testing.assert_array_equal(ours, t.numpy())


def test_bad_sizes_and_config():
    with pytest.raises(ValueError, match="multiple of the pixel autoencoder factor 4"):
        PixelAutoencoder(PixelAutoencoderConfig()).encode(jnp.zeros((1, 6, 8, 3)))
    with pytest.raises(ValueError, match="factor"):
        PixelAutoencoderConfig(factor=0)
