"""Hands the memory XLA's compiler used back to the operating system once a compile is done.

Compiling the sampler makes glibc's heap grow by hundreds of MB: XLA's fusion emitters hold ~1.35
MiB for every distinct kernel of a program until its compile ends, whatever the kernel computes
(364 kernels, ~475 MiB, in the 64x64 DDIM program; benchmarks/compile_memory.py,
benchmarks/RESULTS.md, "Issue 19, CPU round 14"). The compiler frees that memory, but glibc keeps
freed heap pages mapped for reuse, so the process held it through the whole video: at 256x256 x 24
frames on one CPU core, ~400 MiB of freed compiler memory, and a peak of 1,255 MiB where 1,015 MiB
is enough (round 12). ``malloc_trim(0)`` returns such pages; ``release_after_compiles`` calls it
after every compile that took at least ``min_seconds`` (short compiles free little, and the trim
walks the whole heap). Without glibc (macOS, musl) it does nothing.

jax reports a compile only after writing it to the persistent compilation cache, and writing it
serialises the program: at 64x64 x 24 frames that took 73 MiB more on top of the compiler's freed
but still resident memory, the process's peak (910 -> 982 MiB; round 16). So the trim also runs just
before each such write, where this jax has the function that writes (``jax._src.compiler._cache_write``,
a private name: without it only the trim after the compile is left).

``AnimatePipeline`` and training (``train.run.train``) turn it on; it only returns memory that is
already free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable

import jax

# jax records this event after each backend compile (or persistent-cache load), before the program runs.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_listener: Callable | None = None
_unwrapped_cache_write: Callable | None = None


def _glibc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def release_after_compiles(min_seconds: float = 1.0, trim: Callable[[], object] | None = None) -> bool:
    """From now on, after every compile of at least ``min_seconds`` (and before its persistent-cache
    write, if any), return the heap's free pages to the system (``trim``: glibc's ``malloc_trim(0)``
    by default). Once per process: later calls change nothing. Returns whether a listener is
    installed (False without glibc)."""
    global _listener
    if _listener is not None:
        return True
    trim = trim or _glibc_trim()
    if trim is None:
        return False

    def listener(event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT and duration >= min_seconds:
            trim()

    jax.monitoring.register_event_duration_secs_listener(listener)
    _listener = listener
    _trim_before_cache_writes(min_seconds, trim)
    return True


def _trim_before_cache_writes(min_seconds: float, trim: Callable[[], object]) -> bool:
    """Wraps jax's persistent-cache write so that a compile of at least ``min_seconds`` is trimmed
    before it is serialised. Returns whether this jax has the function to wrap."""
    global _unwrapped_cache_write
    from jax._src import compiler

    write = getattr(compiler, "_cache_write", None)
    if write is None:
        return False

    @functools.wraps(write)
    def trimmed_write(cache_key, compile_time_secs, *args, **kwargs):
        # jax writes only programs that took at least its own minimum to compile
        if compile_time_secs >= max(min_seconds, jax.config.jax_persistent_cache_min_compile_time_secs):
            trim()
        return write(cache_key, compile_time_secs, *args, **kwargs)

    _unwrapped_cache_write = write
    compiler._cache_write = trimmed_write
    return True


def stop() -> None:
    """Removes the listener (tests)."""
    global _listener, _unwrapped_cache_write
    if _listener is not None:
        jax.monitoring.unregister_event_duration_listener(_listener)
        _listener = None
    if _unwrapped_cache_write is not None:
        from jax._src import compiler

        compiler._cache_write = _unwrapped_cache_write
        _unwrapped_cache_write = None
