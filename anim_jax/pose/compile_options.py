"""How the pose networks are prepared and compiled for a platform.

On CPU the detector's wide 3x3 convolutions run as Winograd convolutions (:func:`prepare`, applied
by the extractor to the detector only; ``anim_jax.pose.winograd``), and the networks' ``jax.jit``s
carry one XLA:CPU option (below).

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


def prepare(model, platform: str, *, winograd: bool | None = None):
    """``model`` as the extractor runs its detector on ``platform``: on CPU (or with ``winograd=True``) a copy
    with its wide 3x3 stride-1 convolutions as Winograd convolutions (``layers.use_winograd``);
    elsewhere, or with ``winograd=False``, ``model`` itself."""
    from anim_jax.pose.layers import use_winograd

    if winograd is None:
        winograd = platform == "cpu"
    return use_winograd(model) if winograd else model


def winograd_layers(model) -> int:
    """How many of ``model``'s convolutions :func:`prepare` made Winograd convolutions."""
    from flax import nnx

    from anim_jax.pose.layers import WinogradKernel

    return sum(isinstance(node, WinogradKernel) for _, node in nnx.iter_graph(model))


def jit(fn, platform: str, **kwargs):
    """``jax.jit(fn, **kwargs)`` with :func:`compiler_options` for ``platform``."""
    import jax

    return jax.jit(fn, compiler_options=compiler_options(platform), **kwargs)
