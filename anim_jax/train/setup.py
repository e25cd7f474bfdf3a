"""Everything a training run needs besides data: mesh, sharded train state and the jitted step."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from anim_jax import parallel
from anim_jax.models.animate_anyone import AnimateAnyone
from anim_jax.train import optim
from anim_jax.train import state as train_state
from anim_jax.train.architecture import build_model, plain
from anim_jax.train.batches import as_clips, batch_shardings, batch_spec
from anim_jax.train.loss import LossConfig, make_loss_fn
from anim_jax.models.remat import apply_remat
from anim_jax.train.schedules import training_schedule
from anim_jax.train.stages import trainable_filter, trained_components
from anim_jax.train.weights import init_model

log = logging.getLogger(__name__)

def mesh_from_config(cfg) -> jax.sharding.Mesh:
    m = cfg.mesh
    devices = jax.devices()
    n = int(m.get("num_devices", 0) or 0)
    if n:
        if n > len(devices):
            raise ValueError(f"config.mesh.num_devices={n} but only {len(devices)} devices are available")
        devices = devices[:n]
    return parallel.make_mesh(tuple(m.shape), tuple(m.axis_names), devices=devices)


def rules_from_config(cfg) -> tuple:
    return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in cfg.mesh.rules)


def global_batch_size(cfg, mesh) -> int:
    d = cfg.data
    if int(d.batch_size) > 0:
        return int(d.batch_size)
    return int(d.per_device_batch_size) * mesh.devices.size


@dataclasses.dataclass
class Trainer:
    """Everything a training run needs besides data: the jitted step and its inputs."""

    state: train_state.TrainState
    train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    loss_fn: Callable
    optimizer: Any
    mask: optim.TrainableFilter
    mesh: jax.sharding.Mesh
    batch_spec: dict
    batch_shardings: dict
    global_batch_size: int
    model_step: Callable  # the same step without remat (for model FLOPs), taking states with...
    model_graphdef: Any  # ...this graphdef (``state.graphdef`` has the rematerialising classes)
    memo: dict = dataclasses.field(default_factory=dict)  # per compiled step: e.g. its FLOPs

    def put_batch(self, batch: Mapping[str, Any]) -> dict:
        """This process's rows of a batch (numpy) -> global, sharded ``jax.Array``s as the step takes
        them (keys of ``batch_spec`` only; ``index`` and other extras are dropped). Always feed the
        step this way: jit compiles again for numpy inputs after sharded ones."""
        batch = as_clips(batch)
        out = {}
        for k, sharding in self.batch_shardings.items():
            if k not in batch:
                raise KeyError(f"the batch has no {k!r} (has {sorted(batch)})")
            out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        return out

    def lower(self, *, model_step: bool = False):
        """Lowers the train step (``model_step``: its remat-free twin) for the abstract state and
        batch, without compiling."""
        step_fn, state = self.train_step, self.state
        if model_step:
            step_fn, state = self.model_step, state.replace(graphdef=self.model_graphdef)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k]) for k, v in self.batch_spec.items()}
        return step_fn.lower(train_state.abstract_like(state), batch)


# Jitted steps by everything their computation depends on, so a second run in the same process
# (a resume, a test) reuses the compilation instead of tracing and compiling again.
_STEP_CACHE: dict = {}


def xla_options(text: str) -> dict[str, str]:
    """``train.xla_options`` ("key=value,key=value") as ``jax.jit``'s ``compiler_options``."""
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config.train.xla_options: expected key=value[,key=value...], got {text!r}")
        out[key.strip()] = value.strip()
    return out


def _jitted_steps(cfg, state, mask, loss_cfg, tx, shardings, spec, mesh):
    policy = cfg.model.get("remat", "none")
    options = xla_options(cfg.train.get("xla_options", ""))
    key = (tuple(sorted(options.items())), mask, state.graphdef, policy, loss_cfg, training_schedule(cfg), json.dumps(plain(cfg.optimizer), sort_keys=True),
           tuple((k, v.shape, str(v.dtype)) for k, v in sorted(spec.items())), mesh, rules_from_config(cfg))
    if key not in _STEP_CACHE:
        loss_fn = make_loss_fn(loss_cfg, training_schedule(cfg))
        plain_step = train_state.jit_train_step(train_state.make_train_step(loss_fn, tx), state, shardings,
                                                compiler_options=options)
        step, graphdef = plain_step, state.graphdef
        if policy != "none":
            # Same parameters and paths, rematerialising graph: only the graphdef differs.
            remat_model = nnx.merge(state.graphdef, state.params, state.frozen)
            trained = [name for name in trained_components(remat_model, mask) if name in ("reference_net", "denoiser")]
            n = sum(apply_remat(getattr(remat_model, name), policy) for name in trained)
            log.info("remat %r on %d blocks of %s", policy, n, "/".join(trained))
            graphdef = nnx.split(remat_model, mask, ...)[0]
            step = train_state.jit_train_step(train_state.make_train_step(loss_fn, tx), state.replace(graphdef=graphdef),
                                              shardings, compiler_options=options)
        _STEP_CACHE[key] = (loss_fn, plain_step, step, state.graphdef, graphdef, {})
    return _STEP_CACHE[key]


def setup(cfg, *, mesh=None, model: AnimateAnyone | None = None, abstract: bool = False) -> Trainer:
    """Model (``init_model`` unless given), trainable mask, optimizer, sharded train state and the
    jitted, donating train step; what trains is ``cfg.trainable``. ``abstract``: the state as ``ShapeDtypeStruct``s
    with their shardings, nothing allocated (``Trainer.lower`` and FLOP counts at any size)."""
    mesh = mesh or mesh_from_config(cfg)
    rules = rules_from_config(cfg)
    if model is None:
        model = build_model(cfg, abstract=True) if abstract else init_model(cfg)
    tr = cfg.get("trainable", {}) or {}
    mask = trainable_filter(model, tuple(tr.get("include", ())), tuple(tr.get("exclude", ())))
    tx = optim.make_optimizer(cfg.optimizer)
    frozen_dtype = cfg.model.get("frozen_dtype") or None
    if abstract:
        state = train_state.abstract_train_state(lambda: build_model(cfg), tx, mask, mesh, rules, frozen_dtype)
    else:
        state = train_state.create_train_state(model, tx, mask, mesh, rules, frozen_dtype, rng=int(cfg.seed))
    loss_cfg = LossConfig.from_config(cfg.loss)
    gbs = global_batch_size(cfg, mesh)
    spec = batch_spec(gbs, tuple(cfg.data.resolution), int(cfg.data.clip_size), int(cfg.data.get("n_frames", 1)),
                      bool(cfg.data.get("uint8_output", True)))
    shardings = batch_shardings(mesh, spec)
    loss_fn, plain, step, plain_graphdef, graphdef, memo = _jitted_steps(
        cfg, state, mask, loss_cfg, tx, shardings, spec, mesh)
    state = state.replace(graphdef=graphdef)
    return Trainer(state, step, loss_fn, tx, mask, mesh, spec, shardings, gbs, plain, plain_graphdef, memo)
