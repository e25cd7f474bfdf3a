"""Mapping between NNX parameter trees and PyTorch state dicts.

Our modules mirror the PyTorch module names, so most keys map mechanically:
the NNX path ``down_blocks.0.resnets.0.conv1.kernel`` is the PyTorch key
``down_blocks.0.resnets.0.conv1.weight`` with the kernel transposed. Each checkpoint family adds a
short table of regex renames (applied to the NNX path, in order) for the few places where PyTorch
names carry container indices we do not keep (``to_out.0``, ``ff.net.0.proj``, ...).

Because the direction NNX path -> PyTorch key is a function, one table serves loading
(:func:`anim_jax.convert.loader.load` with ``keymap=``) and export (:func:`export_torch_state_dict`);
kernels change layout by the one rule of :mod:`anim_jax.convert.layout`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from anim_jax.convert import layout


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and misshaped key."""


Rename = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How one checkpoint family names its tensors."""

    renames: Sequence[Rename] = ()
    # Regexes of PyTorch keys that are not parameters here (buffers we recompute, e.g. CLIP
    # position_ids or AnimateDiff's positional-encoding table). They may be present or absent.
    ignored: Sequence[str] = ()


def flat_params(model_or_state) -> dict[str, nnx.Variable]:
    """``{"a.0.b.kernel": Variable}`` for every ``nnx.Param`` of a module (or state)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[".".join(str(p) for p in path)] = var
    return out


def torch_key(nnx_path: str, renames: Sequence[Rename]) -> str:
    key = nnx_path
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    head, _, leaf = key.rpartition(".")
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return f"{head}.{leaf}" if head else leaf


def export_torch_state_dict(model, mapping: KeyMap, *, dtype=None) -> dict[str, np.ndarray]:
    """NNX parameters -> ``{torch_key: numpy array in PyTorch layout}`` (bit-exact, no casting by default)."""
    out = {}
    for path, var in flat_params(model).items():
        value = np.asarray(jax.device_get(var[...]))
        if dtype is not None:
            value = value.astype(dtype)
        out[torch_key(path, mapping.renames)] = layout.to_torch(path, value)
    return out


def compose(*mappings: KeyMap) -> KeyMap:
    return KeyMap(
        renames=tuple(r for m in mappings for r in m.renames),
        ignored=tuple(i for m in mappings for i in m.ignored),
    )


def prefixed(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries under ``prefix.`` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
