"""Rematerialisation of the UNets' blocks in the backward pass (``config.model.remat``)."""

from __future__ import annotations

import functools
import types
from typing import Callable

import jax
import numpy as np
from flax import nnx

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
}


def _remat_call(base_call: Callable, policy):
    """``__call__`` running ``base_call`` under ``jax.checkpoint``; Python scalars stay static."""

    def __call__(self, *args, **kwargs):
        graphdef, state = nnx.split(self)
        leaves, treedef = jax.tree.flatten((args, kwargs))
        dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

        def pure(state, values):
            leaves_ = list(leaves)
            for i, v in zip(dynamic, values):
                leaves_[i] = v
            a, k = jax.tree.unflatten(treedef, leaves_)
            return base_call(nnx.merge(graphdef, state), *a, **k)

        return jax.checkpoint(pure, policy=policy)(state, [leaves[i] for i in dynamic])

    return __call__


@functools.lru_cache(maxsize=None)
def _remat_class(cls: type, policy_name: str) -> type:
    body = {"__call__": _remat_call(cls.__call__, REMAT_POLICIES[policy_name]), "__module__": __name__,
            "__doc__": f"{cls.__name__}, rematerialised in the backward pass (policy {policy_name!r})."}
    return types.new_class(f"Remat{cls.__name__}_{policy_name}", (cls,), exec_body=lambda ns: ns.update(body))


def remat_block_types() -> tuple[type, ...]:
    from anim_jax.models.resnet import ResnetBlock2D
    from anim_jax.models.transformer import Transformer2DModel

    types_: list[type] = [ResnetBlock2D, Transformer2DModel]
    try:
        from anim_jax.models.motion import MotionModule

        types_.append(MotionModule)
    except ImportError:  # pragma: no cover - motion modules are part of the package
        pass
    return tuple(types_)


def apply_remat(module: nnx.Module, policy: str) -> int:
    """Rematerialises every ResNet block, spatial transformer and motion module of ``module`` (the
    granularity of PyTorch gradient checkpointing in Moore's UNet3D): their activations are
    recomputed in the backward pass instead of stored. ``policy``: "none", "full" (save nothing
    inside a block) or "dots" (keep the weight matmul outputs). Parameter paths do not change (each
    block's class is swapped for a rematerialising subclass). Returns the number of blocks."""
    if policy == "none":
        return 0
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {['none', *REMAT_POLICIES]}")
    blocks = remat_block_types()
    count = 0
    for _, node in nnx.iter_graph(module):
        cls = type(node)
        if isinstance(node, blocks) and cls in blocks:
            node.__class__ = _remat_class(cls, policy)
            count += 1
    return count
