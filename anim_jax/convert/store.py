"""Parameters of a converted-weights directory (:mod:`anim_jax.weights_dir`): writing them, and
loading them through the one strict loader (:func:`anim_jax.convert.loader.load`)."""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from anim_jax.convert.loader import load
from anim_jax.convert.mapping import flat_params
from anim_jax.convert.readers import write_safetensors
from anim_jax.weights_dir import CONFIG_NAME, FORMAT_VERSION, read_config, weights_file, write_config

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "load_params", "read_config", "save_params", "weights_file", "write_config"]


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
    """Strictly fills ``model``'s parameters from the safetensors file ``path`` (our layout, keyed by
    NNX path); keeps each parameter's sharding. Returns ``model``."""
    load(model, path, dtype=dtype)
    return model
