"""Rematerialisation for training: ``anim_jax.models.remat`` (kept under this name for old imports)."""

from anim_jax.models.remat import POLICIES as REMAT_POLICIES
from anim_jax.models.remat import apply_remat

__all__ = ["REMAT_POLICIES", "apply_remat"]
