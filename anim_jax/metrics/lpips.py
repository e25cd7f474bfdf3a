"""LPIPS (Zhang et al. 2018, the ``lpips`` package's v0.1 "lin" metric) on converted weights.

The distance between two images is computed as:

1. fixed per-channel scaling of [-1, 1] RGB: ``(x - shift) / scale``;
2. a frozen ImageNet trunk, read at five depths: VGG16's relu1_2 .. relu5_3 or AlexNet's relu1 .. relu5
   (torchvision's ``features`` layers, in torchvision's order);
3. at each depth, every pixel's feature vector is scaled to unit length (+1e-10 against division by 0);
4. the squared difference of the two images' features goes through a learned non-negative 1x1
   projection to one channel (the "lin" layer), which is averaged over space;
5. the five averages are summed.

Weights are not shipped. The user brings torchvision's trunk file (``vgg16-397923af.pth`` or
``alexnet-owt-7be5be79.pth``) and the lpips package's linear layers (``weights/v0.1/vgg.pth`` or
``alex.pth``); :func:`convert_lpips` checks them strictly and writes a converted-weights directory,
and :func:`load_lpips` reads it back (``anim-jax convert-metric lpips``). The files are read by the
torch-free readers, which also take the pre-1.6 (non-zip) format the lpips v0.1 ``.pth`` files use,
and never execute anything from them.

Which input range: the lpips network expects [-1, 1]. ``normalize=True`` (as in lpips) maps [0, 1]
inputs there. :func:`lpips_video` takes uint8 or [0, 1] frames and does this mapping itself, unless
``disco_compatible=True``, which feeds [0, 1] frames unmapped, as DisCo's ``tool/metrics`` code did
(with ``net="vgg"``). Papers that reused that code (MagicAnimate, Champ and others of the period)
report LPIPS this way, so comparing with their tables needs this variant; it is biased relative to
the metric as defined.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anim_jax import storage
from anim_jax.atomic import atomic_dir
from anim_jax.convert import store
from anim_jax.convert.loader import load
from anim_jax.convert.mapping import KeyMap
from anim_jax.media import checked_frames
from anim_jax.models.layers import Conv2d

__all__ = [
    "NETS",
    "LPIPS",
    "LPIPSTrunk",
    "LinearHeads",
    "TRUNK_KEYMAP",
    "LINEAR_KEYMAP",
    "convert_lpips",
    "load_lpips",
    "lpips_frames",
    "lpips_video",
    "min_image_size",
    "tap_channels",
]

NETS = ("vgg", "alex")
VERSION = "0.1"
WEIGHTS_FILE = "lpips.safetensors"
CONFIG_KEY = "lpips"

# The lpips ScalingLayer's constants: [-1, 1] RGB -> roughly ImageNet-normalised input.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class _Conv:
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    padding: int = 0


@dataclasses.dataclass(frozen=True)
class _ReLU:
    pass


@dataclasses.dataclass(frozen=True)
class _MaxPool:
    kernel: int
    stride: int


def _vgg16_layers() -> tuple:
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(_MaxPool(2, 2))
        else:
            layers += [_Conv(cin, v, 3, 1, 1), _ReLU()]
            cin = v
    return tuple(layers)


# torchvision's ``features`` in order, up to the last layer LPIPS reads (list index = torch key index),
# and where each of the five LPIPS slices ends (exclusive), i.e. after which layer a map is tapped.
_ARCH = {
    "vgg": (_vgg16_layers(), (4, 9, 16, 23, 30)),
    "alex": (
        (
            _Conv(3, 64, 11, 4, 2), _ReLU(), _MaxPool(3, 2),
            _Conv(64, 192, 5, 1, 2), _ReLU(), _MaxPool(3, 2),
            _Conv(192, 384, 3, 1, 1), _ReLU(),
            _Conv(384, 256, 3, 1, 1), _ReLU(),
            _Conv(256, 256, 3, 1, 1), _ReLU(),
        ),
        (2, 5, 8, 10, 12),
    ),
}


def _check_net(net: str) -> str:
    if net not in NETS:
        raise ValueError(f"LPIPS net {net!r}: expected one of {NETS}")
    return net


def tap_channels(net: str) -> tuple[int, ...]:
    """Channels of the five compared feature maps (the linear layers' input widths)."""
    layers, ends = _ARCH[_check_net(net)]
    out = []
    for end in ends:
        out.append(next(l.cout for l in reversed(layers[:end]) if isinstance(l, _Conv)))
    return tuple(out)


def _out_size(n: int, layer) -> int:
    if isinstance(layer, _Conv):
        return (n + 2 * layer.padding - layer.kernel) // layer.stride + 1
    if isinstance(layer, _MaxPool):
        return (n - layer.kernel) // layer.stride + 1
    return n


def min_image_size(net: str) -> int:
    """The smallest height/width for which every compared feature map is at least 1x1."""
    layers, ends = _ARCH[_check_net(net)]
    n = 1
    while True:
        size = n
        for layer in layers[: ends[-1]]:
            size = _out_size(size, layer)
            if size < 1:
                break
        if size >= 1:
            return n
        n += 1


class LPIPSTrunk(nnx.Module):
    """torchvision's ``features`` (VGG16 or AlexNet) up to the last compared ReLU.

    Parameters live at ``features.<torchvision index>``, so the PyTorch keys map one to one.
    """

    def __init__(self, net: str = "vgg", *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.net = _check_net(net)
        layers, self.slice_ends = _ARCH[net]
        self.features = nnx.Dict(
            {
                str(i): Conv2d(l.cin, l.cout, l.kernel, stride=l.stride, padding=l.padding, dtype=dtype, rngs=rngs)
                for i, l in enumerate(layers)
                if isinstance(l, _Conv)
            }
        )

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """(B, H, W, 3) scaled input -> the five compared feature maps, channels-last."""
        layers, _ = _ARCH[self.net]
        taps = []
        for i, layer in enumerate(layers[: self.slice_ends[-1]]):
            if isinstance(layer, _Conv):
                x = self.features[str(i)](x)
            elif isinstance(layer, _ReLU):
                x = jax.nn.relu(x)
            else:
                # torch MaxPool2d without padding and with floor division: VALID windows.
                x = jax.lax.reduce_window(
                    x, -jnp.inf, jax.lax.max,
                    (1, layer.kernel, layer.kernel, 1), (1, layer.stride, layer.stride, 1), "VALID",
                )
            if i + 1 in self.slice_ends:
                taps.append(x)
        return taps


class LinearHeads(nnx.Module):
    """The five "lin" layers: bias-free 1x1 convolutions from each map's channels to one."""

    def __init__(self, channels: Sequence[int], *, rngs: nnx.Rngs):
        self.lins = nnx.List(
            [Conv2d(c, 1, 1, padding=0, use_bias=False, dtype=jnp.float32, rngs=rngs) for c in channels]
        )

    def __call__(self, diffs: Sequence[jax.Array]) -> jax.Array:
        """Squared feature differences -> (B,) summed spatial means."""
        total = 0.0
        for lin, d in zip(self.lins, diffs):
            total = total + lin(d).mean(axis=(1, 2))[:, 0]
        return total


def _unit_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + NORM_EPS)


class LPIPS(nnx.Module):
    """LPIPS v0.1 ("lin") distance. ``net``: ``"vgg"`` (animation papers' choice) or ``"alex"`` (lpips default).

    Call ``model(a, b)`` with two (B, H, W, 3) RGB batches **in [-1, 1]** (the lpips convention);
    with ``normalize=True`` they are taken to be **in [0, 1]** and mapped to [-1, 1] first, exactly
    like ``lpips.LPIPS.forward(..., normalize=True)``. Returns (B,) float32 distances.
    ``dtype`` is the trunk's compute dtype; normalisation and the linear layers run in float32.
    """

    def __init__(self, net: str = "vgg", *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.net = _check_net(net)
        self.trunk = LPIPSTrunk(net, dtype=dtype, rngs=rngs)
        self.heads = LinearHeads(tap_channels(net), rngs=rngs)

    def features(self, x: jax.Array, *, normalize: bool = False) -> list[jax.Array]:
        """The five trunk maps of one batch (before unit normalisation)."""
        x = jnp.asarray(x, jnp.float32)
        if normalize:
            x = 2.0 * x - 1.0
        x = (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
        return self.trunk(x)

    def __call__(self, a: jax.Array, b: jax.Array, *, normalize: bool = False) -> jax.Array:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS: the two batches differ in shape: {a.shape} vs {b.shape}")
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"LPIPS: expected (B, H, W, 3) RGB batches, got {a.shape}")
        need = min_image_size(self.net)
        if min(a.shape[1:3]) < need:
            raise ValueError(
                f"LPIPS ({self.net}): images of {a.shape[1]}x{a.shape[2]} are too small, need >= {need}x{need}"
            )
        # One trunk pass over both batches (twice the batch, half the launches).
        n = a.shape[0]
        feats = self.features(jnp.concatenate([a, b], axis=0), normalize=normalize)
        diffs = [jnp.square(_unit_normalize(f[:n]) - _unit_normalize(f[n:])) for f in feats]
        dist = self.heads(diffs)
        # Identical images are at distance exactly 0 (as in the eager PyTorch original); under jit,
        # XLA's fusions can round the two halves differently and leave ~1e-16 (seen on CPU).
        same = jnp.all(jnp.asarray(a) == jnp.asarray(b), axis=(1, 2, 3))
        return jnp.where(same, 0.0, dist)


# ------------------------------------------------------------------------------------------------
# Conversion

# torchvision checkpoints also hold the classifier, which LPIPS never uses.
TRUNK_KEYMAP = KeyMap(ignored=(r"^classifier\.",))
# lpips names each head ``lin<k>.model.1`` (``model.0`` is a parameter-free Dropout).
LINEAR_KEYMAP = KeyMap(renames=((r"^lins\.(\d+)\.", r"lin\1.model.1."),))


def _abstract_model(net: str) -> LPIPS:
    return nnx.eval_shape(lambda: LPIPS(net, rngs=nnx.Rngs(0)))


def _load_part(module: nnx.Module, path: pathlib.Path, mapping: KeyMap, what: str) -> None:
    """Strictly fills ``module`` from one checkpoint file, reading only the tensors it needs."""
    load(module, path, keymap=mapping, dtype=jnp.float32, name=f"{what} file {str(path)!r}")


def convert_lpips(
    trunk_path: str | os.PathLike,
    linear_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    net: str = "vgg",
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Checks and converts LPIPS weights into the converted-weights directory ``out_dir``.

    ``trunk_path``: torchvision's ImageNet state dict for ``net`` (``classifier.*`` is ignored);
    ``linear_path``: lpips's v0.1 linear layers for the same ``net`` (``lin0.model.1.weight`` ..).
    Any missing, unexpected or misshaped key raises one CheckpointMismatchError naming the file.
    The directory appears complete or not at all; an existing non-empty one needs ``overwrite``.
    """
    net = _check_net(net)
    # Inputs may be URLs (gs://): the loader reads them through a temporary local copy.
    trunk_path, linear_path, out = storage.as_path(trunk_path), storage.as_path(linear_path), storage.as_path(out_dir)
    for path in (trunk_path, linear_path, out):
        if storage.is_url(path):  # a missing bucket: one line now
            storage.check_bucket(path, "LPIPS path")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"LPIPS output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"LPIPS output {str(out)!r} exists and is not empty (pass overwrite=True to replace it)"
        )

    model = _abstract_model(net)
    _load_part(model.trunk, trunk_path, TRUNK_KEYMAP, f"LPIPS {net} trunk")
    _load_part(model.heads, linear_path, LINEAR_KEYMAP, f"LPIPS {net} linear-layers")

    from anim_jax import __version__

    with atomic_dir(out) as tmp:
        store.save_params(model, tmp / WEIGHTS_FILE)
        store.write_config(
            tmp,
            {
                CONFIG_KEY: {"net": net, "version": VERSION},
                "conversion": {
                    "tool": f"anim-jax {__version__} convert_lpips",
                    "sources": {"trunk": str(trunk_path), "linear": str(linear_path)},
                },
            },
        )  # last: only a complete directory has anim_jax.json
    return out


def load_lpips(directory: str | os.PathLike, *, dtype=jnp.float32) -> LPIPS:
    """The LPIPS model of a directory written by :func:`convert_lpips`."""
    directory = storage.as_path(directory)
    config = store.read_config(directory)
    entry = config.get(CONFIG_KEY)
    if not isinstance(entry, Mapping) or entry.get("net") not in NETS:
        raise ValueError(
            f"{str(directory)!r} is not an LPIPS conversion: its {store.CONFIG_NAME} has no "
            f"'{CONFIG_KEY}' entry naming one of {NETS} (create one with convert_lpips)"
        )
    if entry.get("version") != VERSION:
        raise ValueError(
            f"{directory / store.CONFIG_NAME}: LPIPS version {entry.get('version')!r}, expected {VERSION!r}"
        )
    model = nnx.eval_shape(lambda: LPIPS(entry["net"], dtype=dtype, rngs=nnx.Rngs(0)))
    load(model, directory / WEIGHTS_FILE)
    return model


# ------------------------------------------------------------------------------------------------
# Videos


def _check_video(video, name: str) -> np.ndarray:
    video = checked_frames(video, name)
    return video if video.dtype == np.uint8 else video.astype(np.float32, copy=False)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _chunk_distances(graphdef, state, a, b, disco_compatible: bool):
    model = nnx.merge(graphdef, state)
    # uint8 travels to the device as is (4x less transfer) and is scaled here.
    a = a.astype(jnp.float32) / 255.0 if a.dtype == jnp.uint8 else a
    b = b.astype(jnp.float32) / 255.0 if b.dtype == jnp.uint8 else b
    return model(a, b, normalize=not disco_compatible)


def lpips_frames(model: LPIPS, pred, true, *, batch_size: int = 8, disco_compatible: bool = False) -> np.ndarray:
    """Per-frame LPIPS (F,) of two (F, H, W, 3) videos, uint8 or float in [0, 1].

    Frames go through the network ``batch_size`` at a time (the last chunk padded, so one compiled
    program serves the whole video), which bounds device memory whatever the video length.
    ``disco_compatible``: see the module docstring.
    """
    pred, true = _check_video(pred, "prediction"), _check_video(true, "target")
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and target {true.shape} differ in shape")
    if pred.dtype != true.dtype:  # one uint8, one float: compare both as [0, 1] floats
        pred, true = (v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v for v in (pred, true))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    frames = pred.shape[0]
    if frames == 0:
        raise ValueError("LPIPS of an empty video (0 frames)")
    chunk = min(batch_size, frames)
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, frames, chunk):
        a, b = pred[start : start + chunk], true[start : start + chunk]
        n = a.shape[0]
        if n < chunk:
            pad = ((0, chunk - n), (0, 0), (0, 0), (0, 0))
            a, b = np.pad(a, pad), np.pad(b, pad)
        out.append(_chunk_distances(graphdef, state, a, b, bool(disco_compatible))[:n])
    return np.concatenate([np.asarray(d) for d in out])


def lpips_video(model: LPIPS, pred, true, *, batch_size: int = 8, disco_compatible: bool = False) -> float:
    """LPIPS of two (F, H, W, 3) videos (uint8 or float in [0, 1]): the mean of the per-frame distances."""
    return float(np.mean(lpips_frames(model, pred, true, batch_size=batch_size, disco_compatible=disco_compatible)))
