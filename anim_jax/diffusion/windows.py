"""Context windows for long videos: which frames each denoiser call sees.

``closed_loop=True`` is Moore-AnimateAnyone's schedule: ``src/pipelines/context.py:uniform`` called
with ``step=0, context_stride=1`` (the only way its pipeline calls it). Window starts are
``0, s, 2s, ... < num_frames`` with ``s = context_size - overlap``, and a window is
``[(j + k) % num_frames for k in range(context_size)]``, so the last one wraps around onto the first
frames (the motion module sees frame F-1 followed by frame 0).

``closed_loop=False`` never wraps: windows start at ``0, s, 2s, ...`` until one reaches the last
frame, and that one is shifted back to end exactly at ``num_frames - 1``. Every window has
``context_size`` frames (so windows batch), and every frame is covered. (Moore's own
``closed_loop=False`` only drops the last start and still wraps; that is not reproduced.)

With ``num_frames <= context_size`` both give the single window ``range(num_frames)``.
"""

from __future__ import annotations

import numpy as np


def _check(num_frames: int, context_size: int, overlap: int) -> None:
    for name, value in (("num_frames", num_frames), ("context_size", context_size), ("overlap", overlap)):
        if int(value) != value:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    if not 0 <= overlap < context_size:
        raise ValueError(f"overlap must satisfy 0 <= overlap < context_size={context_size}, got {overlap}")


def context_windows(
    num_frames: int, context_size: int = 24, overlap: int = 4, closed_loop: bool = True
) -> list[list[int]]:
    """The frame indices of each window, in processing order."""
    _check(num_frames, context_size, overlap)
    if num_frames <= context_size:
        return [list(range(num_frames))]
    stride = context_size - overlap
    if closed_loop:
        starts = range(0, num_frames, stride)
        return [[(j + k) % num_frames for k in range(context_size)] for j in starts]
    last = num_frames - context_size
    starts = list(range(0, last, stride)) + [last]
    return [list(range(j, j + context_size)) for j in starts]


def windows_array(
    num_frames: int, context_size: int = 24, overlap: int = 4, closed_loop: bool = True
) -> np.ndarray:
    """:func:`context_windows` as an int32 array of shape ``(W, min(context_size, num_frames))``,
    ready to gather frames with (``latents[:, idx]``) and to scatter-add predictions back."""
    return np.asarray(context_windows(num_frames, context_size, overlap, closed_loop), dtype=np.int32)


def window_weights(windows, num_frames: int) -> np.ndarray:
    """How many windows cover each frame: int32 ``(num_frames,)``. Dividing the summed window
    predictions by it is Moore's plain average over overlaps. Every frame must be covered."""
    idx = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(w, np.int64).ravel() for w in windows])
    if idx.size and (idx.min() < 0 or idx.max() >= num_frames):
        raise ValueError(f"window indices must lie in [0, {num_frames}), got [{idx.min()}, {idx.max()}]")
    counts = np.bincount(idx, minlength=num_frames).astype(np.int32)
    if (counts == 0).any():
        raise ValueError(f"frames {np.flatnonzero(counts == 0).tolist()} are covered by no window")
    return counts


def pad_windows(windows, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads a window list for an even split over devices: appends copies of window 0 until the
    window count is a multiple of ``multiple``. Returns ``(windows int32 (W', L),
    weights float32 (W',))`` with weight 1 for the real windows and 0 for the copies (they cost
    compute but change nothing)."""
    windows = np.asarray(windows, np.int32)
    weights = np.ones((windows.shape[0],), np.float32)
    pad = (-windows.shape[0]) % max(int(multiple), 1)
    if pad:
        windows = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)])
        weights = np.concatenate([weights, np.zeros((pad,), np.float32)])
    return windows, weights
