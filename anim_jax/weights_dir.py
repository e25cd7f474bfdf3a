"""The converted-weights directory format, below both ``models/`` and ``convert/``.

Layout::

    DIR/anim_jax.json            configurations + provenance (format version, sources)
    DIR/<component>.safetensors  parameters keyed by NNX path, already in our layout (kernels HWIO /
                                 (in, out)), so loading is a strict name and shape check and a copy

``anim-jax convert``, ``anim-jax convert-metric`` and the trainer's export write it;
:mod:`anim_jax.convert.components` builds and fills models from it. The config is written last, so
a directory without it is never taken for a complete one.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from anim_jax import atomic, storage

FORMAT_VERSION = 1
CONFIG_NAME = "anim_jax.json"

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "packaged_demo_weights", "read_config", "weights_file", "write_config"]


def weights_file(directory: str | os.PathLike, name: str):
    return storage.as_path(directory) / f"{name}.safetensors"


def write_config(directory: str | os.PathLike, config: dict[str, Any]) -> None:
    payload = {"format_version": FORMAT_VERSION, **config}
    atomic.write_text(storage.as_path(directory) / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True))


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = storage.as_path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is not a converted-weights directory: {CONFIG_NAME} is missing "
            "(create one with `anim-jax convert`)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-create the directory with `anim-jax convert`") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object; re-create the directory with `anim-jax convert`")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config.get('format_version')!r}, this anim_jax reads {FORMAT_VERSION} "
            "(re-convert the original checkpoints with `anim-jax convert`)"
        )
    return config


def packaged_demo_weights() -> pathlib.Path:
    """The demo model shipped with the package (``anim_jax/demo_weights``), the default of
    ``anim-jax demo`` and ``anim-jax serve``."""
    return pathlib.Path(__file__).resolve().parent / "demo_weights"
