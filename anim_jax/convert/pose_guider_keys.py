"""PoseGuider state-dict keys (``conv_in``, ``blocks.0..5``, ``conv_out``; Moore's ``pose_guider.pth``)
and the stage-1 initialisation from ControlNet's ``controlnet_cond_embedding.*``."""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from anim_jax.convert.loader import expected_torch_shapes, load_torch_state_dict
from anim_jax.convert.mapping import CheckpointMismatchError, KeyMap, prefixed

POSE_GUIDER_KEYMAP = KeyMap()

CONTROLNET_PREFIX = "controlnet_cond_embedding"


def pose_guider_config_from_state_dict(shapes: Mapping[str, object]) -> tuple[int, tuple[int, ...]]:
    """``(conditioning_embedding_channels, block_out_channels)`` of a PoseGuider state dict.

    ``shapes`` maps keys to shapes or to arrays (anything with a ``.shape``). Tells apart the
    released (16, 32, 96, 256) guider and the class default (16, 32, 64, 128), or any other.
    """
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    need = ("conv_in.weight", "conv_out.weight")
    missing = [k for k in need if k not in shape]
    if missing:
        raise CheckpointMismatchError(f"not a PoseGuider state dict: missing {missing}")
    n_blocks = len({int(m[1]) for k in shape if (m := re.match(r"^blocks\.(\d+)\.weight$", k))})
    if n_blocks % 2:
        raise CheckpointMismatchError(f"PoseGuider state dict has an odd number of blocks ({n_blocks})")
    channels = [shape["conv_in.weight"][0]]
    for i in range(1, n_blocks, 2):
        key = f"blocks.{i}.weight"
        if key not in shape:
            raise CheckpointMismatchError(f"PoseGuider state dict: missing {key}")
        channels.append(shape[key][0])
    return int(shape["conv_out.weight"][0]), tuple(int(c) for c in channels)


def load_controlnet_cond_embedding(
    pose_guider, controlnet_state_dict: Mapping[str, np.ndarray], *, source: str = "ControlNet checkpoint"
):
    """Stage-1 init (moore.md 1.6): copy ControlNet's ``controlnet_cond_embedding.*`` into ``pose_guider``
    except ``conv_out``, which is set to zero. Other ControlNet keys are ignored; a missing or
    misshaped embedding key is a CheckpointMismatchError."""
    sub = {k: v for k, v in prefixed(controlnet_state_dict, CONTROLNET_PREFIX).items() if not k.startswith("conv_out.")}
    for key, (_, shape) in expected_torch_shapes(pose_guider, POSE_GUIDER_KEYMAP).items():
        if key.startswith("conv_out."):
            sub[key] = np.zeros(shape, np.float32)
    return load_torch_state_dict(pose_guider, sub, POSE_GUIDER_KEYMAP, source=f"{source} ({CONTROLNET_PREFIX}.*)")
