"""compile_memory: the heap's free pages go back to the system after long compiles."""

import ctypes
import ctypes.util
import os

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
