"""The tiny (CPU-sized) model dimensions shared by the tests, the CPU benchmark and the demo live in
``anim_jax/recipes/tiny.py``; the stage configs select them with ``:tiny``
(``anim-jax train --config configs/stage1.py:tiny``)."""

from anim_jax.recipes.tiny import CLIP_SIZE, IMAGE_ENCODER, MOTION, NUM_FRAMES, POSE_GUIDER, RESOLUTION, UNET, VAE, components

__all__ = ["CLIP_SIZE", "IMAGE_ENCODER", "MOTION", "NUM_FRAMES", "POSE_GUIDER", "RESOLUTION", "UNET", "VAE", "components"]
