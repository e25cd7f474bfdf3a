"""Meshes, logical-axis rules and parameter placement.

Every parameter carries logical axis names (``out_sharding`` metadata, set in
``anim_jax.models.layers``). A rules table maps each logical name to mesh axes; the table lives in
the config so the same model code runs replicated on one CPU, FSDP over a GPU node or FSDP x data
over a pod. A dimension is only sharded when the mesh axes divide it, so tiny test models and odd
channel counts (4 latent channels, 3 RGB channels) stay replicated instead of failing.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# (logical name, mesh axis or tuple of mesh axes or None). The first rule that names an axis wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("batch", ("data", "fsdp")),
)


def use_cpu_devices(n: int) -> None:
    """Makes JAX's CPU backend ``n`` devices that each run their programs on one thread, so that a
    mesh over them runs ``n`` shards side by side on ``n`` cores.

    XLA:CPU's own threads split single operations, and the sampler is thousands of small ones (the
    flash-attention tiles): two threads barely beat one, while two one-thread devices, each with half
    the frames, took 256x256 x 24 frames from 19.5 s to 11-12 s (benchmarks/RESULTS.md, "Issue 19,
    CPU round 8"). Only before JAX initialises its backends (the first ``jax.devices()`` or
    computation of the process): RuntimeError after. Keeps an ``--xla_cpu_multi_thread_eigen`` the
    caller set in ``XLA_FLAGS``."""
    if n < 1:
        raise ValueError(f"CPU device count must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise RuntimeError(
            "CPU devices can only be set before JAX initialises its backends (the process's first "
            "jax.devices() or computation)"
        ) from None
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices=None) -> jax.sharding.Mesh:
    """A mesh with Auto axes (GSPMD propagation). ``-1`` in ``shape`` takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} and axis names {list(axis_names)} differ in length")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} available devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, {len(devices)} are available")
    return jax.make_mesh(
        tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape), devices=devices
    )


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules: Iterable[tuple[str, Any]] = DEFAULT_RULES,
) -> P:
    """PartitionSpec for one array from its logical names; undivisible or reused axes stay replicated."""
    if not logical:
        return P()
    table = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in _as_tuple(table.get(name)) if a in mesh.shape and a not in used)
        n = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if axes and n > 1 and size % n == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """NamedShardings for an ``nnx.State`` (of Variables or arrays), from logical metadata."""

    def one(v):
        if isinstance(v, nnx.Variable):
            logical = v.get_metadata().get("out_sharding")
            return v.replace(NamedSharding(mesh, logical_to_spec(logical, v.shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(x, sharding: NamedSharding):
    """``jax.device_put(x, sharding)`` for a sharding of this process's devices. An array on one
    device bound for several goes through the host: JAX reshards a device array with a compiled
    program per shape and sharding (176 of them to place the tiny training state on 8 CPU devices),
    while a numpy array is sliced on the host and copied, with nothing to compile."""
    if (isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 < len(sharding.device_set)
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)):  # typed PRNG keys have no numpy form
        x = np.asarray(x)
    return jax.device_put(x, sharding)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Places every parameter of ``model`` on ``mesh`` by the rules table (in place; returns it)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.tree.map(place, state, shardings))
    return model


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_axes=("data", "fsdp")) -> NamedSharding:
    """Shard the leading (batch) axis over whichever of ``batch_axes`` the mesh has."""
    axes = tuple(a for a in batch_axes if a in mesh.shape)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
