"""The persistent XLA compilation cache the ``anim-jax`` command line turns on by default.

Compiling the sampling loop takes minutes on a CPU (longer than the video it makes at small sizes)
and holds hundreds of MB that running it does not need; JAX can keep compiled programs on disk and
reuse them in the next process with the same program, shapes, flags and jax version. The command
line points it at ``$XDG_CACHE_HOME/anim_jax/xla`` (``~/.cache/anim_jax/xla`` when
``XDG_CACHE_HOME`` is unset). ``ANIM_JAX_COMPILATION_CACHE=DIR`` picks another folder,
``ANIM_JAX_COMPILATION_CACHE=0`` (or ``--no-compilation-cache``) turns it off, and a
``JAX_COMPILATION_CACHE_DIR`` the user set is left as it is. Only programs that took at least
JAX's ``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile are written.
"""

from __future__ import annotations

import os
import pathlib
from typing import MutableMapping

ENV = "ANIM_JAX_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def default_cache_dir(environ: MutableMapping[str, str] = os.environ) -> pathlib.Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "anim_jax" / "xla"


def configure(disabled: bool = False, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Turns the cache on (unless ``disabled`` or ``ANIM_JAX_COMPILATION_CACHE=0``) by setting
    ``JAX_COMPILATION_CACHE_DIR``, which jax reads when it is imported (by this process later, or by
    its subprocesses); returns the folder, or None when off. A process that has already imported jax
    keeps its own configuration: the command line does not call this there (see ``anim_jax.cli``)."""
    choice = environ.get(ENV, "").strip()
    if disabled or choice.lower() in _OFF:
        return None
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    path = str(pathlib.Path(choice).expanduser() if choice else default_cache_dir(environ))
    environ["JAX_COMPILATION_CACHE_DIR"] = path
    return path
