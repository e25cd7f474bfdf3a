"""The one layout rule between PyTorch tensors and our parameters.

Only parameters named ``kernel`` differ; everything else (biases, norm scales, embeddings) has the
same layout on both sides:

* rank 2, a Linear: PyTorch ``(out, in)`` <-> ours ``(in, out)``;
* rank >= 3, a convolution: PyTorch ``(O, I, *spatial)`` <-> ours ``(*spatial, I, O)`` (OIHW <-> HWIO
  for 2-D convolutions, OIDHW <-> DHWIO for 3-D ones).

Both directions are one reversal of a 3-D view, ``(A, B, C) -> (C, B, A)``: a Linear is viewed as
``(out, 1, in)``, a convolution as ``(O, I, prod(spatial))``. :func:`relayout` makes that copy
cache-blocked (numpy's strided copy of a transposed view walks one side with a large stride and runs
at a few hundred MB/s on large kernels; copying tiles that fit in cache is several times faster).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["is_kernel", "nnx_shape", "relayout", "from_torch", "to_torch", "torch_shape"]


def is_kernel(nnx_path: str) -> bool:
    return nnx_path == "kernel" or nnx_path.endswith(".kernel")


def _moved(nnx_path: str, ndim: int) -> bool:
    return is_kernel(nnx_path) and ndim >= 2


def torch_shape(nnx_path: str, shape) -> tuple[int, ...]:
    """The PyTorch shape of our parameter ``nnx_path`` of shape ``shape``."""
    shape = tuple(int(d) for d in shape)
    if not _moved(nnx_path, len(shape)):
        return shape
    if len(shape) == 2:
        return shape[::-1]
    return (shape[-1], shape[-2], *shape[:-2])


def nnx_shape(nnx_path: str, shape) -> tuple[int, ...]:
    """Our shape of parameter ``nnx_path`` given its PyTorch shape ``shape``."""
    shape = tuple(int(d) for d in shape)
    if not _moved(nnx_path, len(shape)):
        return shape
    if len(shape) == 2:
        return shape[::-1]
    return (*shape[2:], shape[1], shape[0])


def _reverse3(src: np.ndarray, out: np.ndarray) -> None:
    """``out[c, b, a] = src[a, b, c]``, copied in cache-sized tiles."""
    A, B, C = src.shape
    tc = min(C, 1024)
    tb = max(1, 4096 // max(tc, 1))
    ta = 16
    for a in range(0, A, ta):
        for b in range(0, B, tb):
            for c in range(0, C, tc):
                np.copyto(out[c : c + tc, b : b + tb, a : a + ta], src[a : a + ta, b : b + tb, c : c + tc].transpose(2, 1, 0),
                          casting="unsafe")


def relayout(nnx_path: str, value, *, to_nnx: bool, dtype=None) -> np.ndarray:
    """A C-contiguous copy of ``value`` in the other layout (``to_nnx``: PyTorch -> ours), cast to
    ``dtype`` (default: unchanged)."""
    value = np.asarray(value)
    dtype = np.dtype(dtype) if dtype is not None else value.dtype
    if not _moved(nnx_path, value.ndim):
        return np.array(value, dtype=dtype, order="C", copy=True)
    shape = nnx_shape(nnx_path, value.shape) if to_nnx else torch_shape(nnx_path, value.shape)
    out = np.empty(shape, dtype)
    if value.ndim == 2:
        n, m = value.shape
        _reverse3(value.reshape(n, 1, m), out.reshape(m, 1, n))
    elif to_nnx:  # (O, I, *S) -> (*S, I, O)
        O, I = value.shape[:2]
        S = math.prod(value.shape[2:])
        _reverse3(value.reshape(O, I, S), out.reshape(S, I, O))
    else:  # (*S, I, O) -> (O, I, *S)
        I, O = value.shape[-2:]
        S = math.prod(value.shape[:-2])
        _reverse3(value.reshape(S, I, O), out.reshape(O, I, S))
    return out


def from_torch(nnx_path: str, value, dtype=None) -> np.ndarray:
    """A PyTorch tensor (numpy) in our layout."""
    return relayout(nnx_path, value, to_nnx=True, dtype=dtype)


def to_torch(nnx_path: str, value, dtype=None) -> np.ndarray:
    """Our parameter (numpy) in PyTorch layout."""
    return relayout(nnx_path, value, to_nnx=False, dtype=dtype)
