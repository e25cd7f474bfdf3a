"""Rematerialisation (gradient checkpointing) of UNet blocks, switched per block by a setting.

``apply_remat(module, policy)`` marks every ResNet block, spatial transformer and motion module
inside ``module`` (the granularity of PyTorch gradient checkpointing in Moore's UNet3D) with a
policy; the UNet calls marked blocks through ``call``, i.e. under ``nnx.remat``, so their
activations are recomputed in the backward pass instead of stored. The mark is a static attribute,
so it lives in the module's graphdef; parameters and their paths do not change.
"""

from __future__ import annotations

import jax
from flax import nnx

from anim_jax.models.motion import MotionModule
from anim_jax.models.resnet import ResnetBlock2D
from anim_jax.models.transformer import Transformer2DModel

POLICIES = {
    "full": None,  # save nothing inside a block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
}


BLOCK_TYPES = (ResnetBlock2D, Transformer2DModel, MotionModule)


def apply_remat(module: nnx.Module, policy: str) -> int:
    """Marks the blocks of ``module`` with ``policy``: "none" (unmark), "full" or "dots". Returns
    the number of blocks."""
    if policy != "none" and policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {['none', *POLICIES]}")
    count = 0
    for _, node in nnx.iter_graph(module):
        if isinstance(node, BLOCK_TYPES):
            node.remat_policy = None if policy == "none" else policy
            count += 1
    return 0 if policy == "none" else count


def call(block: nnx.Module, *args, **static):
    """``block(*args, **static)``, under ``nnx.remat`` when the block is marked. ``static``: Python
    values (frame counts) that shape the computation; ``args`` may hold arrays and pytrees."""
    policy = getattr(block, "remat_policy", None)
    if policy is None:
        return block(*args, **static)
    return nnx.remat(lambda b, *a: b(*a, **static), policy=POLICIES[policy])(block, *args)
