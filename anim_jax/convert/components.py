"""The five Animate Anyone components of a converted-weights directory (:mod:`anim_jax.weights_dir`):
built from their JSON architectures (:func:`anim_jax.models.factory.build`, shapes only) and filled
by the one strict loader, or written back."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from anim_jax import storage, weights_dir
from anim_jax.convert.loader import load
from anim_jax.convert.store import save_params
from anim_jax.diffusion import NoiseSchedule
from anim_jax.models.attention_ops import AttentionConfig
from anim_jax.models.factory import COMPONENTS, build, component_config, to_json

__all__ = ["load_components", "save_components"]


def load_components(directory: str | os.PathLike, *, dtype=jnp.float32, attention: AttentionConfig | None = None,
                    components: tuple[str, ...] = COMPONENTS) -> dict[str, Any]:
    """``{component: module, ..., "schedule": NoiseSchedule}`` from a converted-weights directory."""
    directory = storage.as_path(directory)
    config = weights_dir.read_config(directory)
    out: dict[str, Any] = {}
    for name in components:
        if name not in config:
            raise ValueError(f"{directory / weights_dir.CONFIG_NAME} has no {name!r} entry")
        module = build(name, config[name], dtype=dtype, attention=attention, abstract=True)
        load(module, weights_dir.weights_file(directory, name))
        out[name] = module
    out["schedule"] = NoiseSchedule.from_config(config.get("schedule", {}))
    return out


def save_components(directory: str | os.PathLike, components: dict[str, Any], *, schedule: NoiseSchedule,
                    extra: dict | None = None) -> None:
    """Writes modules + ``anim_jax.json`` (weights first, the config last: a directory without its
    config is never mistaken for a complete one). Over an existing directory the old config goes
    first, so an interrupted rewrite never reads as complete. ``directory`` may be a URL."""
    directory = storage.as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)  # (on an object store: nothing to create)
    marker = directory / weights_dir.CONFIG_NAME
    if marker.exists():
        marker.unlink()
    config: dict[str, Any] = dict(extra or {})
    for name, module in components.items():
        save_params(module, weights_dir.weights_file(directory, name))
        config[name] = component_config(name, module)
    config["schedule"] = to_json(schedule)
    weights_dir.write_config(directory, config)
