"""The tests' one door to the application-level model (the five networks as one object).

Tests that need its behaviour (latent scaling, the training objective) go through these helpers,
so a rename or move of that class is adapted here only.
"""

from __future__ import annotations

from anim_jax.models.animate_anyone import AnimateAnyone


def bundle(*, reference_net=None, denoiser=None, pose_guider=None, vae=None, image_encoder=None):
    return AnimateAnyone(reference_net=reference_net, denoiser=denoiser, pose_guider=pose_guider, vae=vae,
                         image_encoder=image_encoder)


def encode_latents(vae, images):
    """Images in [-1, 1] -> the diffusion model's (scaled) latents: the posterior mean, as at inference."""
    return bundle(vae=vae).encode(images)


def decode_latents(vae, latents):
    """Scaled latents -> images in [0, 1]."""
    return bundle(vae=vae).decode(latents)
