"""The training batch format: keys, shapes and dtypes as the step receives them, and their shardings."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from anim_jax import parallel

BATCH_KEYS = {1: ("target", "pose", "reference", "clip"), 2: ("frames", "poses", "reference", "clip")}


def as_video_batch(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A stage-1 or stage-2 batch (grain_pipeline element format, float or uint8 images) ->
    ``(frames (B,F,H,W,3) in [-1,1], poses (B,F,H,W,3) in [0,1], reference (B,H,W,3), clip uint8)``."""
    from data_pipelines.grain_pipeline import normalize_batch

    batch = normalize_batch(batch)
    if "frames" in batch:
        frames, poses = batch["frames"], batch["poses"]
    elif "target" in batch:
        frames, poses = batch["target"][:, None], batch["pose"][:, None]
    else:
        raise KeyError(f"a training batch needs 'target'/'pose' (stage 1) or 'frames'/'poses' (stage 2); got {sorted(batch)}")
    return frames, poses, batch["reference"], batch["clip"]


def batch_spec(stage: int, batch_size: int, resolution: Sequence[int], clip_size: int, num_frames: int = 1,
               uint8: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global training batch as the step receives it (no ``index``)."""
    h, w = resolution
    img = jnp.uint8 if uint8 else jnp.float32
    lead = (batch_size,) if stage == 1 else (batch_size, num_frames)
    keys = BATCH_KEYS[stage]
    return {
        keys[0]: jax.ShapeDtypeStruct(lead + (h, w, 3), img),
        keys[1]: jax.ShapeDtypeStruct(lead + (h, w, 3), img),
        "reference": jax.ShapeDtypeStruct((batch_size, h, w, 3), img),
        "clip": jax.ShapeDtypeStruct((batch_size, clip_size, clip_size, 3), jnp.uint8),
    }


def batch_shardings(mesh, spec: Mapping[str, Any]) -> dict:
    """Leading (batch) axis over the mesh's data/fsdp axes, the rest replicated."""
    return {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in spec.items()}
