"""Mapping between NNX parameter trees and PyTorch state dicts.

Our modules mirror the PyTorch module names, so most keys map mechanically:
the NNX path ``down_blocks.0.resnets.0.conv1.kernel`` is the PyTorch key
``down_blocks.0.resnets.0.conv1.weight`` with the kernel transposed. Each checkpoint family adds a
short table of regex renames (applied to the NNX path, in order) for the few places where PyTorch
names carry container indices we do not keep (``to_out.0``, ``ff.net.0.proj``, ...).

Because the direction NNX path -> PyTorch key is a function, one table serves loading and export,
and strict checking is a set comparison: missing, unexpected and misshaped keys are all reported
together in one error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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


def to_torch_layout(nnx_path: str, value: np.ndarray) -> np.ndarray:
    """NNX array -> PyTorch layout (conv HWIO -> OIHW, linear (in,out) -> (out,in))."""
    if nnx_path.endswith(".kernel") or nnx_path == "kernel":
        if value.ndim == 4:
            return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
    return value


def from_torch_layout(nnx_path: str, value: np.ndarray) -> np.ndarray:
    if nnx_path.endswith(".kernel") or nnx_path == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return value.T
    return value


def expected_torch_shapes(model, mapping: KeyMap) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{torch_key: (nnx_path, torch_shape)}`` for every parameter of ``model``."""
    out = {}
    for path, var in flat_params(model).items():
        key = torch_key(path, mapping.renames)
        shape = tuple(var.shape)
        if path.endswith("kernel") and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif path.endswith("kernel") and len(shape) == 2:
            shape = (shape[1], shape[0])
        if key in out:
            raise AssertionError(f"mapping sends both {out[key][0]} and {path} to {key}")
        out[key] = (path, shape)
    return out


def check_keys(
    expected: Mapping[str, tuple[str, tuple[int, ...]]],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    ignored: Sequence[str] = (),
) -> None:
    """Raise one CheckpointMismatchError listing every missing, unexpected and misshaped key."""
    ignore = [re.compile(p) for p in ignored]
    given = {k for k in shapes if not any(p.search(k) for p in ignore)}
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(shapes[k])}, model expects {expected[k][1]}"
        for k in set(expected) & given
        if tuple(shapes[k]) != tuple(expected[k][1])
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("misshaped keys", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {s}" for s in shown)
        raise CheckpointMismatchError("\n".join(lines))


def load_torch_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    mapping: KeyMap,
    *,
    source: str = "checkpoint",
    dtype=None,
) -> nnx.Module:
    """Strictly loads a PyTorch-layout state dict (numpy arrays) into ``model`` in place.

    Values keep the parameter's dtype unless ``dtype`` is given. Existing shardings are kept:
    each new value is placed like the parameter it replaces.
    """
    expected = expected_torch_shapes(model, mapping)
    check_keys(expected, {k: np.shape(v) for k, v in state_dict.items()}, source=source, ignored=mapping.ignored)
    params = flat_params(model)
    for key, (path, _) in expected.items():
        var = params[path]
        value = from_torch_layout(path, np.asarray(state_dict[key]))
        target_dtype = dtype or var.dtype
        arr = jnp.asarray(value, dtype=target_dtype)
        # .value (not [...]) also works on abstract parameters from nnx.eval_shape.
        sharding = getattr(var.value, "sharding", None)
        if sharding is not None:
            arr = jax.device_put(arr, sharding)
        var.value = arr
    return model


def export_torch_state_dict(model, mapping: KeyMap, *, dtype=None) -> dict[str, np.ndarray]:
    """NNX parameters -> ``{torch_key: numpy array in PyTorch layout}`` (bit-exact, no casting by default)."""
    out = {}
    for path, var in flat_params(model).items():
        value = np.asarray(jax.device_get(var[...]))
        if dtype is not None:
            value = value.astype(dtype)
        out[torch_key(path, mapping.renames)] = to_torch_layout(path, value)
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
