"""compile_memory: the heap's free pages go back to the system after long compiles."""

import ctypes
import ctypes.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from anim_jax import compile_memory


@pytest.fixture
def fresh_listener():
    compile_memory.stop()  # a pipeline built by an earlier test may have installed the real one
    yield
    compile_memory.stop()


X = jnp.ones((3,))


def _compile_something_new(n: int):
    # a function object jax has not seen, so the call compiles (once: its input already exists)
    return jax.jit(lambda x: jnp.tanh(x * n) + n)(X).block_until_ready()


def test_trims_after_compiles_that_took_long_enough(fresh_listener):
    calls = []
    assert compile_memory.release_after_compiles(min_seconds=0.0, trim=lambda: calls.append(1))
    _compile_something_new(1)
    assert len(calls) == 1
    _compile_something_new(2)
    assert len(calls) == 2
    jax.jit(lambda x: x + 1)  # no call, no compile
    assert len(calls) == 2


def test_short_compiles_are_left_alone(fresh_listener):
    calls = []
    compile_memory.release_after_compiles(min_seconds=1e6, trim=lambda: calls.append(1))
    _compile_something_new(3)
    assert calls == []


def test_installs_once(fresh_listener):
    first, second = [], []
    assert compile_memory.release_after_compiles(min_seconds=0.0, trim=lambda: first.append(1))
    assert compile_memory.release_after_compiles(min_seconds=0.0, trim=lambda: second.append(1))
    _compile_something_new(4)
    assert (len(first), second) == (1, [])


def test_without_glibc_nothing_is_installed(fresh_listener, monkeypatch):
    monkeypatch.setattr(compile_memory, "_glibc_trim", lambda: None)
    assert not compile_memory.release_after_compiles()
    assert compile_memory._listener is None


WRITE_ORDER = """
import pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from anim_jax import compile_memory
cache = pathlib.Path(sys.argv[1])
seen = []  # cache entries present at each trim
compile_memory.release_after_compiles(min_seconds=0.0, trim=lambda: seen.append(len(list(cache.iterdir()))))
jax.jit(lambda x: jnp.cos(x) * 7)(np.arange(3.0)).block_until_ready()  # one compile
print(seen)
"""


def test_trims_before_the_persistent_cache_write_too(tmp_path):
    """jax writes a compile to its persistent cache before reporting the compile: the freed compiler
    memory is trimmed first (once before the write, once after the compile), and the entry is still
    written."""
    cache = tmp_path / "xla"
    cache.mkdir()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", WRITE_ORDER, str(cache)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "[0, 1]", proc.stdout
    assert any(f.name.startswith("jit__lambda") for f in cache.iterdir())


def test_stop_restores_the_cache_write(fresh_listener):
    from jax._src import compiler

    original = compiler._cache_write
    compile_memory.release_after_compiles(trim=lambda: None)
    assert compiler._cache_write is not original
    compile_memory.stop()
    assert compiler._cache_write is original


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_glibc_trim_returns_freed_heap_pages():
    trim = compile_memory._glibc_trim()
    assert trim is not None  # the CI and development machines run glibc
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 96 MiB of 64 KiB heap blocks (below glibc's mmap threshold), written so their pages are
    # resident, then freed below the highest one, still in use: free() alone keeps them (as after
    # a compile).
    blocks = sorted(libc.malloc(64 * 1024) for _ in range(1537))
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    guard = blocks.pop()
    before = _rss_mib()
    for b in blocks:
        libc.free(b)
    kept = _rss_mib()
    trim()
    after = _rss_mib()
    libc.free(guard)
    assert before - kept < 16, (before, kept)
    assert kept - after > 64, (kept, after)
