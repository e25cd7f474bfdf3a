"""One training run: data, validation, the loop with its hooks, checkpoints and the final export.

Work directory::

    WORKDIR/config.json           the resolved config (process 0)
    WORKDIR/checkpoints/<step>/   Orbax: train state, data-iterator state, metadata (resumed from automatically)
    WORKDIR/logs/                 TensorBoard event file: loss, loss_t/*, grad_norm, lr, step_time,
                                  examples_per_sec, mfu; validation videos (GIF) under logs/videos/
    WORKDIR/validation/           the validation samples as mp4
    WORKDIR/export/               at the end: a converted-weights directory of the trained model (the next
                                  stage's init.weights_dir, or anim-jax animate --weights)

Order of start-up: config -> mesh -> model and train state -> data -> checkpoint manager (resume)
-> loop. MFU: the step's model FLOPs come from XLA's cost analysis of the lowered step (without
remat); see ``train.flops.step_flops``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anim_jax import compile_memory, native
from anim_jax.checkpoint import CheckpointManager
from anim_jax import atomic, storage
from anim_jax.convert.components import save_components
from anim_jax.train import metrics as metrics_lib
from anim_jax.train.data import DeviceBatches
from anim_jax.train.flops import step_flops
from anim_jax.train.loop import STATUS_COMPLETED, train_loop
from anim_jax.train.schedules import export_schedule
from anim_jax.train.setup import setup
from anim_jax.train.validation import Validator

log = logging.getLogger("anim_jax.train")


def _write_config(cfg, workdir: pathlib.Path) -> None:
    atomic.write_text(workdir / "config.json", cfg.to_json_best_effort(indent=2, sort_keys=True))


def export(state, workdir: pathlib.Path, name: str = "export", *, stage: int | None = None, cfg=None) -> pathlib.Path:
    """The trained model (trained and frozen parts) as a converted-weights directory
    (``convert.components.save_components``, float32) with the inference schedule of ``cfg.diffusion``,
    written by process 0. Every process must call it: with several processes the parameters are
    gathered collectively first."""
    out = workdir / name
    model = state.model()
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        pure = multihost_utils.process_allgather(pure, tiled=True)
    else:
        pure = jax.device_get(pure)
    pure = jax.tree.map(lambda x: np.asarray(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x), pure)
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    if jax.process_index() == 0:
        save_components(out, model.components(), schedule=export_schedule(cfg),
                        extra={"source": "anim-jax train", "stage": stage, "step": int(jax.device_get(state.step)),
                               native.KEY: native.from_training_config(cfg if cfg is not None else {}).to_json()})
    return out


def train(cfg, workdir, *, source=None) -> "object":
    """One training run (see the module docstring); returns the loop's ``LoopResult``. ``source``:
    training records in memory instead of the dataset directory ``cfg.data.dataset`` (the demo's)."""
    workdir = storage.absolute(workdir)  # a local path or a URL (gs://bucket/runs/s1)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)  # (nothing to create on an object store)
        _write_config(cfg, workdir)
    compile_memory.release_after_compiles()
    t0 = time.perf_counter()
    trainer = setup(cfg)
    log.info("stage %d: %d trainable / %d frozen parameters, global batch %d on mesh %s (%.1fs)", int(cfg.stage),
             _count(trainer.state.params), _count(trainer.state.frozen), trainer.global_batch_size,
             dict(trainer.mesh.shape), time.perf_counter() - t0)
    tc = cfg.train
    flops = None
    if tc.get("compute_flops", True):
        flops = count_step_flops(trainer, cfg)
    data = DeviceBatches(cfg, trainer, source)
    writer = metrics_lib.MetricWriter(workdir / "logs", enabled=is_main)
    hooks = []
    if int(cfg.validation.every) > 0:
        validator = Validator(cfg, trainer, workdir, writer)
        hooks.append(lambda step, state, metrics: validator(step, state) if step % validator.every == 0 else None)

    loop_cfg = dict(global_batch_size=trainer.global_batch_size, flops_per_step=flops,
                    peak_flops_per_device=float(tc.get("peak_flops_per_device", 0.0)) or None)
    ckpt = CheckpointManager(workdir / "checkpoints", max_to_keep=int(tc.max_to_keep), async_save=bool(tc.async_save),
                             include_frozen=bool(tc.include_frozen))
    try:
        result = train_loop(
            loop_cfg, trainer.state, trainer.train_step, data, ckpt, writer,
            num_steps=int(tc.num_steps), save_every=int(tc.save_every), log_every=int(tc.log_every),
            hooks=hooks, metadata={"stage": int(cfg.stage), "config": json.loads(cfg.to_json_best_effort())},
        )
    finally:
        ckpt.close()
        data.close()
        writer.close()
    if result.status == STATUS_COMPLETED and tc.get("export", True):
        path = export(result.state, workdir, stage=int(cfg.stage), cfg=cfg)
        log.info("exported the trained model to %s", path)
    return result


def count_step_flops(trainer, cfg) -> float | None:
    """``flops.step_flops``, or None with a warning saying why (MFU is then not reported): a FLOP
    count is a diagnostic and must not stop a training run."""
    t0 = time.perf_counter()
    try:
        flops = step_flops(trainer, cfg)
    except Exception as e:  # noqa: BLE001 - any failure of the cost analysis only loses the MFU metric
        log.warning("counting the train step's FLOPs failed (%s: %s): MFU will not be reported", type(e).__name__, e)
        return None
    if not flops:
        log.warning("XLA's cost analysis gives no FLOP count on this backend: MFU will not be reported")
        return None
    log.info("model FLOPs per step (XLA cost analysis, no remat): %.4g (%.1fs)", flops, time.perf_counter() - t0)
    return flops


def _count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
