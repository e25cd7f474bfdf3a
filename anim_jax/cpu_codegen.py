"""XLA:CPU code generation sized to the host's vector registers.

XLA:CPU hands large matmuls and convolutions to libraries (YNNPACK, Eigen) and compiles everything
else itself through LLVM: the elementwise fusions (the flash attention's exponentials, GroupNorm,
the activations) and the reductions it keeps. Its LLVM backend prefers 256-bit vectors
(``xla_cpu_prefer_vector_width=256``) also on CPUs with AVX-512's 512-bit registers. Letting it use
them made the sampler's DDIM steps faster on this project's Sapphire Rapids host (one thread,
medians of interleaved calls of the same program compiled both ways,
``benchmarks/cpu_vector_width.py``): 5-16% at 256x256 x 24 frames over three runs, 2-4% at 64x64
and 512x512; results differ only by float32 rounding (``benchmarks/RESULTS.md``, "Issue 19, CPU
round 13").

:func:`jit` is ``jax.jit`` that compiles with :func:`compiler_options` for the backend it runs
on: the option on a CPU backend whose host has AVX-512, nothing otherwise. It is passed per
compilation, never through the process-wide ``XLA_FLAGS``, so code outside the programs that use
it keeps XLA's defaults; a user who sets ``--xla_cpu_prefer_vector_width`` in ``XLA_FLAGS`` keeps
that choice.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax

VECTOR_WIDTH_OPTION = "xla_cpu_prefer_vector_width"


@functools.cache
def host_vector_bits(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    """The widest SIMD registers the host's CPU has, in bits, as far as ``cpuinfo`` (Linux) says:
    512 with AVX-512, 256 with AVX, 128 otherwise; None where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), None)
    except OSError:
        return None
    if flags is None:
        return None
    if "avx512f" in flags:
        return 512
    return 256 if "avx" in flags else 128


def compiler_options(platform: str, vector_bits: int | None = None) -> dict[str, int] | None:
    """The XLA options this project's programs compile with on ``platform`` ("cpu", "gpu", "tpu"),
    for a host with ``vector_bits``-wide registers (default: :func:`host_vector_bits`)."""
    if platform != "cpu" or VECTOR_WIDTH_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    bits = host_vector_bits() if vector_bits is None else vector_bits
    return {VECTOR_WIDTH_OPTION: 512} if bits == 512 else None


class _BackendJit:
    """``jax.jit(fun, **kwargs)``, one per backend, each compiled with that backend's options."""

    def __init__(self, fun: Callable, options: dict | None, kwargs: dict):
        self._fun, self._options, self._kwargs, self._jitted = fun, dict(options or {}), kwargs, {}
        functools.update_wrapper(self, fun)

    def _for_backend(self):
        platform = jax.default_backend()
        if platform not in self._jitted:
            options = {**(compiler_options(platform) or {}), **self._options} or None
            self._jitted[platform] = jax.jit(self._fun, compiler_options=options, **self._kwargs)
        return self._jitted[platform]

    def __call__(self, *args, **kwargs):
        return self._for_backend()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._for_backend().lower(*args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        return self._for_backend().eval_shape(*args, **kwargs)


def jit(fun: Callable | None = None, *, compiler_options: dict | None = None, **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options` for the default backend at
    call time, updated with ``compiler_options`` (those win); a decorator with or without arguments."""
    if fun is None:
        return lambda f: _BackendJit(f, compiler_options, kwargs)
    return _BackendJit(fun, compiler_options, kwargs)
