"""How the pose networks are compiled: one XLA:CPU option, scoped to their own ``jax.jit``s.

XLA:CPU (jaxlib 0.10) hands convolutions and matmuls above a size threshold to YNNPACK by default.
On DWPose's networks YNNPACK's convolutions ran slower than XLA:CPU's Eigen path, which the option
below selects: on this project's 2-vCPU Sapphire Rapids host, single layers ran 1.3x to 3.5x faster
(RTMPose's 7x7 head conv 248 -> 71 ms, its 3x3 convs 1.4-2x), and the two networks together went
from 0.83x to 1.03x onnxruntime's CPU throughput (``benchmarks/RESULTS.md``). Results differ from
YNNPACK's only by float32 rounding.

The option is passed per compilation (``jax.jit(..., compiler_options=...)``), never through the
process-wide ``XLA_FLAGS``, so every other jitted function keeps XLA's defaults. It applies on CPU
only. A user who sets ``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` keeps that choice.
"""

from __future__ import annotations

import os

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(platform: str) -> dict[str, str] | None:
    """The XLA options the pose networks compile with on ``platform`` ("cpu", "gpu", "tpu")."""
    if platform != "cpu" or YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    return {YNN_FUSION_OPTION: ""}  # no library fusions: XLA's own (Eigen) convolutions and dots


def jit(fn, platform: str, **kwargs):
    """``jax.jit(fn, **kwargs)`` with :func:`compiler_options` for ``platform``."""
    import jax

    return jax.jit(fn, compiler_options=compiler_options(platform), **kwargs)
