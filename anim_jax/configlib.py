"""Loading ``ml_collections`` Python configs with ``--config.a.b=value`` overrides.

A config file is a Python file defining ``get_config(arg=None)`` (``configs/stage1.py``); an
optional ``path.py:arg`` suffix is passed as ``arg`` (e.g. ``configs/stage1.py:tiny``). The file may
be a URL (``gs://bucket/configs/mine.py:tiny``). Overrides are
parsed against the type of the field they replace, so a typo or a wrong type is an error that names
the field instead of a silently ignored value. Every such mistake is a :class:`ConfigError`
(one line naming the field; the ``anim-jax`` command reports it without a traceback).
"""

from __future__ import annotations

import ast
import importlib.util
import math
from typing import Sequence

import ml_collections

from anim_jax import storage

PREFIX = "--config."


class ConfigError(ValueError):
    """A config file, a ``--config.`` override or a config value is wrong; the message names it."""


def split_spec(spec: str) -> tuple[str, str]:
    """``(path, arg)`` of ``path.py:arg``; a URL's ``scheme://`` is part of the path."""
    scheme, sep, rest = spec.partition("://") if storage.is_url(spec) else ("", "", spec)
    path, _, arg = rest.partition(":")
    return scheme + sep + path, arg


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    path, arg = split_spec(spec)
    if storage.is_url(path):
        storage.check_bucket(path, "--config")
    if not storage.as_path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with storage.local_copy(path) as file:  # a URL: downloaded (importlib executes local files only)
        module_spec = importlib.util.spec_from_file_location(f"_anim_jax_config_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # e.g. an unknown variant after the ':'
        raise ConfigError(f"config {spec!r}: {e}") from e


def _parse_value(text: str, current, name: str):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config override {name}: expected a boolean, got {text!r}")
    if isinstance(current, str) or current is None:
        if current is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        return text
    if isinstance(current, float):
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"config override {name}: expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"config override {name}: expected a finite number, got {text!r}")
        return value
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"config override {name}: cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if not isinstance(value, type(current)):
        raise ConfigError(
            f"config override {name}: expected {type(current).__name__}, got {type(value).__name__} ({text!r})"
        )
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` (or ``config.a.b=value``) strings to ``config`` in place."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if not text.startswith("config.") or "=" not in text:
            raise ConfigError(f"config override {item!r}: expected --config.<field>=<value>")
        dotted, _, raw = text[len("config."):].partition("=")
        node = config
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not hasattr(node, "keys") or part not in node:
                raise ConfigError(f"config override {item!r}: no field {part!r}{_known(node)}")
            node = node[part]
        leaf = parts[-1]
        if not hasattr(node, "keys") or leaf not in node:
            raise ConfigError(f"config override {item!r}: no field {leaf!r}{_known(node)}")
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[leaf] = _parse_value(raw, node[leaf], dotted)
    return config


def _known(node) -> str:
    return f" (known: {', '.join(sorted(node.keys()))})" if hasattr(node, "keys") else " (not a config section)"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(spec), overrides)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.x=y`` items from the other command-line arguments."""
    overrides, rest = [], []
    for a in argv:
        (overrides if a.startswith(PREFIX) else rest).append(a)
    return overrides, rest
