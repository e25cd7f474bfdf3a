"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3), for the pose detector on CPU.

A 3x3 convolution computed on 6x6 input tiles for 4x4 output tiles: the input tiles and the kernel
are moved into a 36-point transform domain, where the convolution becomes 36 independent matmuls
over channels with 4x fewer multiplications than the direct form, then moved back (Lavin & Gray,
arXiv 1509.09308). XLA:CPU has no such algorithm (its convolutions are direct), and YOLOX-L spends
most of its time in 3x3 stride-1 convolutions. On one core of this project's CPU its 40x40x256
layers took 12.3 ms direct and 5.4 ms here, and the whole detector 1163 -> 753 ms (769 -> 542 ms on
two vCPUs; ``benchmarks/pose_conv.py``, numbers in ``benchmarks/RESULTS.md``).

Accuracy: the transforms use the interpolation points 0, 1, -1, 1/2, -2 (and infinity), whose
float32 error is about 3x smaller than the classic 0, +-1, +-2 (Barabasz et al., arXiv 1803.10986).
On YOLOX-L's layers the largest error against a float64 convolution is 3.4e-6 to 5.4e-6 of the
output's scale, against 3.7e-7 to 5.3e-7 for XLA's direct convolution. The kernel transform is done once, when a model is prepared
(``anim_jax.pose.layers.use_winograd``), not on every call; the transformed kernel takes 4x the
memory of the 3x3 one (36 points for 9 taps).

Not used on GPU or TPU, whose convolution libraries choose their own algorithms.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

TILE = 4  # output tile side
POINTS = 6  # transform-domain side: TILE + 3 - 1

# Toom-Cook matrices for the points 0, 1, -1, 1/2, -2 and infinity: Y = AT [(G g G^T) * (BT d B)] A.
BT = np.array([
    [1, -1.5, -2, 1.5, 1, 0],
    [0, -1, 0.5, 2.5, 1, 0],
    [0, 1, -2.5, 0.5, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 0.5, -1, -0.5, 1, 0],
    [0, 1, -1.5, -2, 1.5, 1],
])  # fmt: skip
G = np.array([
    [1, 0, 0],
    [1 / 3, 1 / 3, 1 / 3],
    [-1 / 3, 1 / 3, -1 / 3],
    [-16 / 15, -8 / 15, -4 / 15],
    [1 / 15, -2 / 15, 4 / 15],
    [0, 0, 1],
])  # fmt: skip
AT = np.array([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 0.5, -2, 0],
    [0, 1, 1, 0.25, 4, 0],
    [0, 1, -1, 0.125, -8, 1],
])  # fmt: skip


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """(3, 3, C, K) HWIO kernel -> (36, C, K): ``G g G^T`` per input/output channel pair."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"Winograd F(4x4, 3x3) needs a 3x3 kernel, got {kernel.shape[:2]}")
    g = jnp.asarray(G, kernel.dtype)
    u = jnp.einsum("ik,jl,klcd->ijcd", g, g, kernel, precision=jax.lax.Precision.HIGHEST)
    return u.reshape(POINTS * POINTS, *kernel.shape[2:])


def _combine(coefs, terms):
    """sum(c * t) over the nonzero coefficients, without multiplying by +-1 (all fused by XLA)."""
    out = None
    for c, t in zip(coefs, terms):
        if c == 0:
            continue
        t = t if c == 1 else -t if c == -1 else t * np.asarray(c, t.dtype)
        out = t if out is None else out + t
    return out


def conv3x3(x: jax.Array, transformed_kernel: jax.Array) -> jax.Array:
    """``Conv2d(3, stride=1, padding=1)`` without bias of (B, H, W, C) ``x`` with a kernel from
    :func:`transform_kernel`; any H and W (the last tiles run over zero padding and are cropped).

    Each transform is written as sums of strided slices, which XLA fuses into one pass over memory
    (a row pass then a column pass); as small matmuls the same transforms took 2-3x longer.
    """
    b, h, w, c = x.shape
    n, m = POINTS, TILE
    th, tw = -(-h // m), -(-w // m)
    xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - w), (0, 0)))
    # Input transform BT d B: over tile rows, then over tile columns -> (6, 6, B, th, tw, C).
    rows = [jax.lax.slice_in_dim(xp, r, r + m * (th - 1) + 1, m, axis=1) for r in range(n)]
    r = jnp.stack([_combine(BT[i], rows) for i in range(n)])
    cols = [jax.lax.slice_in_dim(r, s, s + m * (tw - 1) + 1, m, axis=3) for s in range(n)]
    v = jnp.stack([_combine(BT[j], cols) for j in range(n)], axis=1).reshape(n * n, b * th * tw, c)
    # One matmul over channels per transform point.
    k = transformed_kernel.shape[-1]
    mm = jnp.einsum("tnc,tck->tnk", v, transformed_kernel).reshape(n, n, b, th, tw, k)
    # Output transform AT M A, rows then columns -> 4x4 output tiles, interleaved into the image.
    z = jnp.stack([_combine(AT[p], [mm[i] for i in range(n)]) for p in range(m)])
    y = jnp.stack([_combine(AT[q], [z[:, j] for j in range(n)]) for q in range(m)], axis=-2)
    y = y.transpose(1, 2, 0, 3, 4, 5).reshape(b, th * m, tw * m, k)
    return y[:, :h, :w]
