"""The one strict loader: fills a model's parameters from a checkpoint and says what it did.

    report = load(model, "weights/denoiser.safetensors")                    # our layout, by NNX path
    report = load(unet, reader, keymap=UNET_KEYMAP)                          # a PyTorch state dict
    report = load(denoiser, "weights/denoiser.safetensors", select=is_motion)  # only some parameters

``source`` is a weights file (a ``.safetensors`` file through the checked
:class:`~anim_jax.convert.readers.SafetensorsReader`, anything else through
:func:`~anim_jax.convert.readers.open_checkpoint`; a truncated or corrupt file is one
``CheckpointReadError`` naming it), any ``Mapping`` of arrays (a
state dict, an open reader), or another NNX module (its parameters). Without ``keymap`` the source
is keyed by NNX path and already in our layout (what ``anim-jax convert`` writes); with a
``KeyMap`` it is a PyTorch state dict: keys are renamed by the map and kernels re-laid-out by
:mod:`anim_jax.convert.layout`.

Strict: every selected parameter present with its shape and a floating dtype, and every source key
a parameter of the model (or ignored by the map / ``ignore``). All problems are reported together
in one :class:`CheckpointMismatchError` that names the source, before any parameter is changed.
Each new value is placed like the parameter it replaces (sharding kept, abstract parameters from
``nnx.eval_shape`` included), one tensor in host memory at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anim_jax import storage
from anim_jax.convert import layout
from anim_jax.convert.mapping import CheckpointMismatchError, KeyMap, flat_params, torch_key

__all__ = ["LoadReport", "check_keys", "expected_torch_shapes", "load", "load_torch_state_dict"]

_SHOWN = 20  # problems listed per kind; the rest are counted


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _matcher(patterns: Sequence[str] | Callable[[str], bool]) -> Callable[[str], bool]:
    if callable(patterns):
        return patterns
    compiled = [re.compile(p) for p in patterns]
    return lambda key: any(p.search(key) for p in compiled)


def check_keys(
    expected: Mapping[str, Sequence[int]],
    given: Mapping[str, Sequence[int]],
    *,
    source: str,
    ignored: Sequence[str] | Callable[[str], bool] = (),
    files: Mapping[str, str] | None = None,
    dtypes: Mapping[str, Any] | None = None,
) -> None:
    """Raises one CheckpointMismatchError listing every missing, unexpected, misshaped and
    non-floating key (``expected``: ``{key: shape}`` the model needs; ``given``: ``{key: shape}`` the
    checkpoint has; ``files``: which file holds each given key, when there are several; ``dtypes``:
    the given keys' dtypes, checked for the expected keys)."""
    ignore = _matcher(ignored)  # only keys the model does not expect can be ignored
    keys = {k for k in given if k in expected or not ignore(k)}
    missing = sorted(set(expected) - keys, key=_natural_key)
    unexpected = sorted(keys - set(expected), key=_natural_key)
    common = sorted(set(expected) & keys, key=_natural_key)
    misshaped = [k for k in common if tuple(given[k]) != tuple(expected[k])]
    # ml_dtypes' bfloat16/float8 are kind "V" and fine.
    not_float = [k for k in common if dtypes is not None and np.dtype(dtypes[k]).kind in "biuc"]
    if not (missing or unexpected or misshaped or not_float):
        return
    where = (lambda k: f" in {files[k]}") if files else (lambda k: "")
    several = files is not None and len(set(files.values())) > 1
    lines = [f"{source} does not match the model:"]

    def section(label: str, items: list[str], fmt: Callable[[str], str]) -> None:
        if items:
            lines.append(f"  {len(items)} {label}:")
            lines.extend(f"    {fmt(k)}" for k in items[:_SHOWN])
            if len(items) > _SHOWN:
                lines.append(f"    ... and {len(items) - _SHOWN} more")

    section("missing keys (in none of the files)" if several else "missing keys", missing,
            lambda k: f"{k} {tuple(expected[k])}")
    section("unexpected keys", unexpected, lambda k: f"{k} {tuple(given[k])}{where(k)}")
    section("misshaped keys", misshaped,
            lambda k: f"{k}: checkpoint {tuple(given[k])}{where(k)}, model expects {tuple(expected[k])}")
    section("keys with a non-floating dtype", not_float,
            lambda k: f"{k}: {np.dtype(dtypes[k])}{where(k)}, expected floating point")
    raise CheckpointMismatchError("\n".join(lines))


def expected_torch_shapes(model, mapping: KeyMap) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{torch_key: (nnx_path, torch_shape)}`` for every parameter of ``model``."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path, var in flat_params(model).items():
        key = torch_key(path, mapping.renames)
        if key in out:
            raise AssertionError(f"mapping sends both {out[key][0]} and {path} to {key}")
        out[key] = (path, layout.torch_shape(path, var.shape))
    return out


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load` did: the parameters it filled, the selected ones the source lacked (kept
    as they were, where ``allow_missing`` accepted that) and the source keys it left unused."""

    source: str
    loaded: tuple[str, ...]
    kept: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    def __str__(self) -> str:
        extra = ([f"{len(self.kept)} kept as they were"] if self.kept else []) + (
            [f"{len(self.unused)} source keys unused"] if self.unused else [])
        return f"loaded {len(self.loaded)} parameters from {self.source}" + (f" ({', '.join(extra)})" if extra else "")


class _ModuleSource(Mapping):
    def __init__(self, module):
        self._params = flat_params(module)

    def __getitem__(self, key):
        return self._params[key].get_value()

    def __iter__(self):
        return iter(self._params)

    def __len__(self):
        return len(self._params)


@contextlib.contextmanager
def _opened(source, name: str | None):
    from anim_jax.convert import readers

    if isinstance(source, (str, os.PathLike)):
        shown = str(source)
        with storage.local_copy(source) as path:  # a gs:// file is downloaded first (readers seek and mmap)
            opener = readers.SafetensorsReader if path.suffix == ".safetensors" else readers.open_checkpoint
            with opener(path) as reader:
                yield reader, name or shown
    elif isinstance(source, (nnx.Module, nnx.State)):
        yield _ModuleSource(source), name or type(source).__name__
    elif isinstance(source, Mapping):
        yield source, name or str(getattr(source, "path", "checkpoint"))
    else:
        raise TypeError(f"cannot load from a {type(source).__name__}: expected a path, a mapping or a module")


def _shape(reader, key) -> tuple[int, ...]:
    return tuple(reader.shape(key)) if hasattr(reader, "shape") and callable(reader.shape) else tuple(np.shape(reader[key]))


def _dtype(reader, key) -> np.dtype:
    if hasattr(reader, "dtype") and callable(reader.dtype):
        return np.dtype(reader.dtype(key))
    value = reader[key]
    return np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def load(
    model,
    source,
    *,
    keymap: KeyMap | None = None,
    select: Callable[[str], bool] | None = None,
    ignore: Sequence[str] | Callable[[str], bool] = (),
    allow_missing: Callable[[str], bool] | None = None,
    dtype=None,
    name: str | None = None,
) -> LoadReport:
    """Strictly fills ``model``'s parameters from ``source`` in place (see the module docstring).

    ``select(nnx_path)``: the parameters to fill (default all); source keys of the others are
    skipped, not unexpected. ``ignore``: regexes of (or a predicate on) source keys that may be
    present without a parameter, added to ``keymap.ignored``. ``allow_missing(nnx_path)``: selected
    parameters the source may lack (they keep their values). ``dtype``: the new values' dtype
    (default: each parameter's own). ``name``: how errors and the report name the source.
    """
    params = flat_params(model)
    renames = keymap.renames if keymap is not None else ()
    key_of = {path: torch_key(path, renames) if keymap is not None else path for path in params}
    if len(set(key_of.values())) != len(key_of):
        raise AssertionError("the key map sends two parameters to one key")
    wanted = {path for path in params if select is None or select(path)}
    skipped_keys = {key_of[p] for p in params if p not in wanted}
    ignored = _matcher(tuple(keymap.ignored) if keymap is not None else ())
    extra = _matcher(ignore)

    def shape_in_source(path):
        shape = tuple(params[path].shape)
        return layout.torch_shape(path, shape) if keymap is not None else shape

    with _opened(source, name) as (reader, label):
        given = {k: _shape(reader, k) for k in reader if k not in skipped_keys}
        present = {key_of[p] for p in wanted} & set(given)
        kept = sorted((p for p in wanted if key_of[p] not in given and allow_missing is not None and allow_missing(p)),
                      key=_natural_key)
        expected = {key_of[p]: shape_in_source(p) for p in wanted if p not in kept}
        check_keys(expected, given, source=label, ignored=lambda k: ignored(k) or extra(k),
                   dtypes={k: _dtype(reader, k) for k in present})
        loaded = []
        for path in sorted(wanted - set(kept), key=_natural_key):
            var = params[path]
            value = reader[key_of[path]]
            if keymap is not None:
                value = layout.from_torch(path, value)
            arr = _fresh_array(value, dtype or var.dtype)
            # .value (not [...]) also works on abstract parameters from nnx.eval_shape.
            sharding = getattr(var.value, "sharding", None)
            var.value = jax.device_put(arr, sharding) if sharding is not None else arr
            loaded.append(path)
        unused = sorted(set(given) - set(expected), key=_natural_key)
    return LoadReport(source=label, loaded=tuple(loaded), kept=tuple(kept), unused=tuple(unused))


def _fresh_array(value, dtype) -> jax.Array:
    """``value`` as a new device array of ``dtype``. A fresh buffer even when the source is a device
    array of that dtype (another module's parameter) or host memory XLA could alias (a mapped
    file): sharing it would let a donating train step free both. Host arrays are cast on the host
    and copied over: ``jnp.array(..., copy=True)`` compiled a conversion program per parameter
    shape, which stayed cached (52 programs, ~70 MiB, for the side-by-side's tiny model)."""
    dtype = jnp.dtype(dtype)
    if isinstance(value, jax.Array):
        if value.dtype == dtype:
            return jax.device_put(value, may_alias=False)
        return jnp.array(value, dtype=dtype, copy=True)
    # our own host copy: device_put may alias host memory (on the CPU even with may_alias=False)
    return jax.device_put(np.array(value, dtype=dtype, copy=True))


def load_torch_state_dict(model, state_dict: Mapping[str, Any], mapping: KeyMap, *, source: str = "checkpoint",
                          dtype=None):
    """:func:`load` of a PyTorch-layout state dict through ``mapping``; returns ``model`` (for chaining)."""
    load(model, state_dict, keymap=mapping, name=source, dtype=dtype)
    return model
