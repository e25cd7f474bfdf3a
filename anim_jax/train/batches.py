"""The training batch format: keys, shapes and dtypes as the step receives them, and their shardings.

Every stage trains on clips: ``frames``/``poses`` (B, F, H, W, 3), ``reference`` (B, H, W, 3) and
``clip`` (B, S, S, 3). Single-frame data (stage 1's ``target``/``pose`` elements) is a clip of one
frame; ``as_clips`` converts it at the data layer, before the batch reaches the device.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anim_jax import parallel
from data_pipelines.grain_pipeline import normalize_batch

BATCH_KEYS = ("frames", "poses", "reference", "clip")


def as_clips(batch: Mapping[str, Any]) -> dict:
    """A host batch of single frames (``target``/``pose`` (B, H, W, 3)) -> clips of one frame
    (``frames``/``poses`` (B, 1, H, W, 3)); clip batches pass through."""
    if "target" not in batch:
        return dict(batch)
    out = {k: v for k, v in batch.items() if k not in ("target", "pose")}
    out["frames"], out["poses"] = np.asarray(batch["target"])[:, None], np.asarray(batch["pose"])[:, None]
    return out


def as_video_batch(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A clip batch, or a batch of single frames (grain_pipeline element formats, float or uint8) ->
    ``(frames (B,F,H,W,3) in [-1,1], poses (B,F,H,W,3) in [0,1], reference (B,H,W,3), clip uint8)``."""
    batch = normalize_batch(batch)
    if "frames" in batch:
        frames, poses = batch["frames"], batch["poses"]
    elif "target" in batch:
        frames, poses = batch["target"][:, None], batch["pose"][:, None]
    else:
        raise KeyError(f"a training batch needs 'frames'/'poses' (or single-frame 'target'/'pose'); got {sorted(batch)}")
    return frames, poses, batch["reference"], batch["clip"]


def batch_spec(batch_size: int, resolution: Sequence[int], clip_size: int, num_frames: int = 1,
               uint8: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global training batch as the step receives it (no ``index``)."""
    h, w = resolution
    img = jnp.uint8 if uint8 else jnp.float32
    return {
        "frames": jax.ShapeDtypeStruct((batch_size, num_frames, h, w, 3), img),
        "poses": jax.ShapeDtypeStruct((batch_size, num_frames, h, w, 3), img),
        "reference": jax.ShapeDtypeStruct((batch_size, h, w, 3), img),
        "clip": jax.ShapeDtypeStruct((batch_size, clip_size, clip_size, 3), jnp.uint8),
    }


def batch_shardings(mesh, spec: Mapping[str, Any]) -> dict:
    """Leading (batch) axis over the mesh's data/fsdp axes, the rest replicated."""
    return {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in spec.items()}
