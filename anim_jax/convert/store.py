"""The converted-weights directory: what ``anim-jax convert`` writes and the pipeline/trainer load.

Layout::

    DIR/anim_jax.json            model configurations + provenance (format version, sources)
    DIR/<component>.safetensors  parameters keyed by NNX path, already in our layout

Parameters are stored in our own layout (kernels HWIO / (in, out)), so loading is a strict name
and shape check followed by a copy, with no per-load transposes. ``anim_jax.convert.mapping``
exports back to PyTorch layout when needed.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anim_jax.convert.mapping import CheckpointMismatchError, flat_params
from anim_jax.convert.readers import read_safetensors, write_safetensors

FORMAT_VERSION = 1
CONFIG_NAME = "anim_jax.json"


def replace_dir(new: pathlib.Path, out: pathlib.Path) -> None:
    """Moves the complete directory ``new`` to ``out``, replacing an existing ``out`` (moved aside
    first, removed after), and syncs the parent so the rename survives a crash."""
    import secrets
    import shutil

    from anim_jax.convert.readers import _fsync_dir

    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
    _fsync_dir(out.parent)


def atomic_write(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _DeferredHostArray:
    """A parameter's shape and dtype now, its host copy only when the writer asks for the data."""

    def __init__(self, var, dtype):
        self._var, self.shape = var, tuple(var.shape)
        self.dtype = np.dtype(dtype) if dtype is not None else np.dtype(var.dtype)

    def __array__(self, dtype=None, copy=None):
        value = np.asarray(jax.device_get(self._var[...])).astype(self.dtype, copy=False)
        return value if dtype is None else value.astype(dtype, copy=False)


def save_params(model_or_arrays, path: str | os.PathLike, *, dtype=None) -> None:
    """Writes every parameter (keyed by NNX path) to ``path`` atomically, one tensor in host memory at a time."""
    if isinstance(model_or_arrays, Mapping):
        arrays = {k: (np.asarray(v).astype(dtype) if dtype is not None else np.asarray(v)) for k, v in model_or_arrays.items()}
    else:
        arrays = {k: _DeferredHostArray(v, dtype) for k, v in flat_params(model_or_arrays).items()}
    write_safetensors(path, arrays)


def load_params(model: nnx.Module, path: str | os.PathLike, *, dtype=None) -> nnx.Module:
    """Strictly fills ``model``'s parameters from ``path``; keeps each parameter's sharding."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    arrays = read_safetensors(path)  # the checked reader: a truncated file is a CheckpointReadError naming it
    params = flat_params(model)
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    misshaped = sorted(
        f"{k}: file {arrays[k].shape}, model {tuple(params[k].shape)}"
        for k in set(params) & set(arrays)
        if tuple(arrays[k].shape) != tuple(params[k].shape)
    )
    if missing or unexpected or misshaped:
        msg = [f"{path} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                msg.append(f"  {len(items)} {title}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        raise CheckpointMismatchError("\n".join(msg))
    for k, var in params.items():
        arr = jnp.asarray(arrays[k], dtype=dtype or var.dtype)
        # .value (not [...]) also works on abstract parameters from nnx.eval_shape.
        sharding = getattr(var.value, "sharding", None)
        var.value = jax.device_put(arr, sharding) if sharding is not None else arr
    return model


def write_config(directory: str | os.PathLike, config: dict[str, Any]) -> None:
    payload = {"format_version": FORMAT_VERSION, **config}
    text = json.dumps(payload, indent=2, sort_keys=True)
    atomic_write(pathlib.Path(directory) / CONFIG_NAME, lambda tmp: pathlib.Path(tmp).write_text(text))


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is not a converted-weights directory: {CONFIG_NAME} is missing "
            "(create one with `anim-jax convert`)"
        )
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {config.get('format_version')!r}, this anim_jax reads {FORMAT_VERSION}")
    return config
