"""Row-wise layer stacks run a few rows at a time, so their wide intermediates stay in the caches.

A feed-forward block writes a ``rows x 8C`` projection, a ``rows x 4C`` gated product and reads both
back; over a whole UNet level (49,152 tokens x 32 channels at 256x256 with guidance) that is 75 MB
going through memory several times for a few hundred MFLOP, and on a CPU those passes, not the
arithmetic, set the time. ``map_rows`` runs such a stack (anything whose every output row depends
only on the same input row: norms, projections, the feed-forward, a motion module's whole
per-position path) over chunks of rows in an XLA loop, so each chunk's intermediates are written
and read back while they are still in cache: the top level's feed-forward 65-77 -> 25-29 ms on one
CPU core (benchmarks/RESULTS.md, "Issue 19, CPU round 9").

Only CPU backends chunk (``AttentionConfig.row_chunk_elements``); on accelerators a loop of small
matmuls would only cost parallelism. Under a mesh (``jax.set_mesh``) with the rows split over
``AttentionConfig.flash_batch_axes``, each device loops over its own rows.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _chunking(rows: int, target: int) -> tuple[int, int]:
    """(chunk, steps) for ``rows`` rows in chunks of about ``target``: a divisor of ``rows`` when one
    is at least half the target (no padding), else ``target`` with the last chunk padded."""
    target = max(1, min(rows, target))
    divisor = max(d for d in range(1, target + 1) if rows % d == 0)
    chunk = divisor if 2 * divisor >= target else target
    return chunk, -(-rows // chunk)


def mesh_row_split(n: int, axes: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
    """The ambient mesh's axes (of ``axes``, size > 1) that split ``n`` rows evenly, and their size."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    devices = math.prod(mesh.shape[a] for a in axes)
    return (axes, devices) if axes and n % devices == 0 else ((), 1)


def map_rows(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, chunk_rows: int,
             axes: tuple[str, ...] = ("data", "fsdp")) -> jax.Array:
    """``fn(x)`` for a row-wise ``fn`` (x ``(N, ...)`` -> ``(N, ...)``, row i of the output from row
    i of the input alone), computed about ``chunk_rows`` rows at a time (per device under a mesh;
    ``chunk_rows`` at least the rows: one call, no loop)."""
    n = x.shape[0]
    mesh_axes, devices = mesh_row_split(n, axes)
    local = n // devices
    chunk, steps = _chunking(local, chunk_rows)
    if steps == 1:
        return fn(x)
    # (D, local, ...) -> (steps, D * chunk, ...): iteration j takes chunk j of every device's rows,
    # so under a mesh the loop walks an axis no device splits and each iteration's rows stay where
    # they are. Padding rows (zeros) go through fn and are dropped.
    xs = x.reshape((devices, local) + x.shape[1:])
    if steps * chunk != local:
        xs = jnp.pad(xs, [(0, 0), (0, steps * chunk - local)] + [(0, 0)] * (x.ndim - 1))
    xs = xs.reshape((devices, steps, chunk) + x.shape[1:]).swapaxes(0, 1).reshape((steps, devices * chunk) + x.shape[1:])
    spec = P(None, mesh_axes or None)
    if mesh_axes:
        xs = jax.lax.with_sharding_constraint(xs, spec)
    ys = jax.lax.map(fn, xs)
    if mesh_axes:
        ys = jax.lax.with_sharding_constraint(ys, spec)
    ys = ys.reshape((steps, devices, chunk) + ys.shape[2:]).swapaxes(0, 1).reshape((devices, steps * chunk) + ys.shape[2:])
    return ys[:, :local].reshape((n,) + ys.shape[2:])


def rows_per_chunk(row_width: int, elements: int) -> int:
    """How many rows of ``row_width`` elements (the widest intermediate per row) fit ``elements``."""
    return max(1, elements // max(1, row_width))


def apply(fn: Callable[[jax.Array], jax.Array], x: jax.Array, config, *, row_width: int) -> jax.Array:
    """``fn(x)``, over chunks of ``x``'s rows when ``config`` (an ``AttentionConfig``) chunks on this
    backend: rows of ``row_width`` elements (of ``fn``'s widest intermediate) up to
    ``config.row_chunk_elements`` at a time."""
    elements = config.row_chunk_elements
    if not elements or jax.default_backend() != "cpu":
        return fn(x)
    return map_rows(fn, x, chunk_rows=rows_per_chunk(row_width, elements), axes=config.flash_batch_axes)
