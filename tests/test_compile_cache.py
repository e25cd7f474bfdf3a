"""The command line's persistent compilation cache: where it goes, how it is turned off, and that jax
imported after the command line starts really writes compiled programs there."""

import os
import pathlib
import subprocess
import sys

from anim_jax import compile_cache

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_cache_folder_and_switches():
    env = {"XDG_CACHE_HOME": "/cache-home"}
    assert compile_cache.configure(environ=env) == "/cache-home/anim_jax/xla"
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/cache-home/anim_jax/xla"
    assert compile_cache.default_cache_dir({}) == pathlib.Path(os.path.expanduser("~")) / ".cache/anim_jax/xla"
    for env in ({"ANIM_JAX_COMPILATION_CACHE": "0"}, {"ANIM_JAX_COMPILATION_CACHE": "off"}, {}):
        disabled = not env
        assert compile_cache.configure(disabled=disabled, environ=env) is None
        assert "JAX_COMPILATION_CACHE_DIR" not in env
    env = {"ANIM_JAX_COMPILATION_CACHE": "/elsewhere"}
    assert compile_cache.configure(environ=env) == "/elsewhere"
    env = {"JAX_COMPILATION_CACHE_DIR": "/users-own", "ANIM_JAX_COMPILATION_CACHE": "/elsewhere"}
    assert compile_cache.configure(environ=env) == "/users-own"  # the user's jax setting wins


SCRIPT = """
import os, sys
from anim_jax import cli
assert cli.main(sys.argv[1:]) == 2  # a usage error, after the cache was configured
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # (when off, jax is not imported: the test stays fast)
    import jax, jax.numpy as jnp
    jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(5.0)).block_until_ready()
    print(jax.config.jax_compilation_cache_dir)
else:
    print("None")
"""


def _run(tmp_path, *flags, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV)}
    env.update(XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=str(REPO), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               **extra)
    p = subprocess.run([sys.executable, "-c", SCRIPT, *flags, "evaluate", str(tmp_path / "a"), str(tmp_path / "b")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()[-1]


def test_cli_turns_the_cache_on_and_off(tmp_path):
    folder = tmp_path / "anim_jax" / "xla"
    assert _run(tmp_path) == str(folder)
    assert any(f.name.startswith("jit__lambda") for f in folder.iterdir())
    off = tmp_path / "off"
    off.mkdir()
    assert _run(off, "--no-compilation-cache") == "None"
    assert not (off / "anim_jax").exists()
