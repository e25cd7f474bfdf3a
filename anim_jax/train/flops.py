"""Model FLOPs of a train step, from XLA's cost analysis (for MFU)."""

from __future__ import annotations

import logging

from ml_collections import ConfigDict

from anim_jax.train.setup import Trainer, setup

log = logging.getLogger(__name__)

def _lowered_flops(lowered) -> float | None:
    try:
        ca = lowered.cost_analysis()
    except NotImplementedError:  # not every backend implements it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def flops_config(cfg):
    """``cfg`` as the FLOP count sees it: plain XLA attention, no remat. The fused (cuDNN) and
    chunked attentions hide their work from XLA's cost analysis (a custom call counts nothing; a
    loop body counts once), while the math, and so the model FLOPs, is the same."""
    c = ConfigDict(cfg.to_dict())
    c.model.attention = "xla"
    c.model.remat = "none"
    return c


def step_flops(trainer: Trainer, cfg=None) -> float | None:
    """Model FLOPs of one global train step: XLA's cost analysis of the lowered step *without*
    remat (recomputation is not model work) and with plain XLA attention (``flops_config``), before
    SPMD partitioning, so it counts the whole global batch once (a compiled program's cost analysis
    describes one device's partition). The lowered count is within a few percent of the compiled
    one (which adds replicated work and removes dead code). Frozen parts count forward only by
    construction: autodiff emits no backward for them. Gradients wrt activations of frozen layers
    between the loss and a trained layer (stage 2: the whole denoiser) are real work and are
    counted. ``cfg``: the trainer's config; when its attention is not "xla" the count lowers an
    abstract twin of the step (tracing only, nothing allocated)."""
    if "flops" not in trainer.memo:
        if cfg is None or cfg.model.attention == "xla":
            flops = _lowered_flops(trainer.lower(model_step=True))
        else:
            flops = _lowered_flops(setup(flops_config(cfg), mesh=trainer.mesh, abstract=True).lower())
        trainer.memo["flops"] = flops
    return trainer.memo["flops"]


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled program (one device's partition) from XLA's cost analysis; includes
    rematerialised recomputation. None when the backend gives none."""
    try:
        ca = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001 - a missing count must not stop the caller; it is told why
        log.warning("XLA cost analysis of the compiled step failed (%s: %s): no FLOP count", type(e).__name__, e)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])
