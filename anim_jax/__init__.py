"""anim_jax: Animate Anyone (character image animation) in JAX / Flax NNX."""

__version__ = "0.1.0"
