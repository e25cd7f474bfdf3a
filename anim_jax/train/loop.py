"""The training loop: resume, steps, metrics, periodic checkpoints, preemption and NaN handling.

Per iteration: next batch -> jitted step -> the loss and gradient norm come back to the host
(one small transfer a step; a non-finite value stops the run before anything is saved) ->
``on_step`` -> metrics every ``log_every`` steps -> a checkpoint every ``save_every`` steps, or at
once when SIGTERM/SIGINT arrived during the step.

Divergence: a checkpoint is written only from a state whose parameters and optimizer state are all
finite (one on-device reduction per save). A finite state can still be poisoned (a huge learning
rate leaves weights of 1e30 that overflow in the next forward pass); the loss of a state on a batch
does not depend on the optimizer, so a checkpoint whose state gives a non-finite loss or gradient
on the next (finite) batch can never be resumed past that batch, whatever the learning rate: it is
deleted, and ``NonFiniteLossError`` names the latest checkpoint that did step on. When the batch
itself holds NaN/Inf the data is blamed and the checkpoint kept.

Exactness: the step's RNG key is ``fold_in(state.rng, state.step)`` and the data iterator's state
is saved with the train state, so ``N steps, save, restore, N steps`` equals ``2N steps`` bitwise
(on a deterministic backend with the same mesh).

Preemption across hosts: a signal may reach the hosts at different steps while a save is a
collective operation, so with several processes the stop step is agreed through JAX's preemption
sync point (``jax.experimental.multihost_utils.reached_preemption_sync_point``, fed by the
coordination service's own SIGTERM notifier); SIGINT is forwarded to it as a SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anim_jax.train import metrics as metrics_lib

log = logging.getLogger(__name__)

STATUS_COMPLETED = "completed"  # reached num_steps
STATUS_PREEMPTED = "preempted"  # a signal arrived: saved and stopped
STATUS_DATA_EXHAUSTED = "data_exhausted"  # the data iterator ran out: saved and stopped


class NonFiniteLossError(RuntimeError):
    """Training diverged: a NaN/Inf loss or gradient norm, or non-finite parameters / optimizer state
    after an update. The bad state was not saved; ``last_checkpoint_step`` (None: there is none)
    is a checkpoint from which training stepped on with a finite loss; ``discarded_step`` is the
    checkpoint deleted because its state produced the non-finite value (see the module docstring)."""

    def __init__(self, step: int, value, name: str, last_checkpoint_step: int | None, *, cause: str = "",
                 discarded_step: int | None = None):
        self.step = step
        self.value = value
        self.name = name
        self.last_checkpoint_step = last_checkpoint_step
        self.discarded_step = discarded_step
        parts = [f"non-finite {name} ({value}) at step {step}"]
        if cause:
            parts.append(cause)
        if discarded_step is not None:
            parts.append(f"deleted checkpoint step {discarded_step}, whose state produced it")
        parts.append("training stopped without saving this state")
        parts.append(
            f"the last good checkpoint is step {last_checkpoint_step}: rerun to resume from it (e.g. with a lower "
            "learning rate)" if last_checkpoint_step is not None else "there is no good checkpoint to resume from"
        )
        super().__init__("; ".join(parts))


@dataclasses.dataclass
class LoopResult:
    status: str
    step: int
    state: Any
    last_checkpoint_step: int | None
    signal: int | None = None
    resumed_from: int | None = None


class _StopFlag:
    """Records SIGTERM/SIGINT instead of dying; the loop saves and returns at the end of the step.

    With several processes, SIGTERM is left to JAX's preemption notifier and SIGINT is turned
    into a SIGTERM to this process, so that every process stops at the same, agreed step."""

    def __init__(self, multiprocess: bool):
        self.signum: int | None = None
        self.multiprocess = multiprocess

    def __call__(self, signum, frame):
        if self.multiprocess:
            log.warning("received signal %d: asking every process to stop at an agreed step", signum)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.signum is None:
            log.warning("received signal %d: finishing the current step, then saving and stopping", signum)
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        if self.multiprocess:
            signals = [signal.SIGINT] if _preemption_service_running() else []
            if not signals:
                log.warning(
                    "%d processes but JAX's preemption service is off (jax_enable_preemption_service): processes "
                    "cannot agree on a step to save at, so SIGTERM/SIGINT end the run without a checkpoint; "
                    "only the periodic checkpoints (train.save_every) are kept", jax.process_count())
        else:
            signals = [signal.SIGTERM, signal.SIGINT]
        if threading.current_thread() is not threading.main_thread():
            log.warning("train_loop runs outside the main thread: signal handling disabled")
            signals = []
        previous = {s: signal.signal(s, self) for s in signals}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _preemption_service_running() -> bool:
    """Whether JAX's preemption sync manager runs: ``jax.distributed`` is initialised with the
    (default) ``jax_enable_preemption_service`` option, which starts it."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class _PreemptionAgreement:
    """``reached(step)``: whether every process has agreed to stop and save at ``step`` (JAX's
    preemption sync point). Off with one process or without the service; if the service fails
    it warns once and is off from then on (a signal then ends the run without a checkpoint)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def reached(self, step: int) -> bool:
        if not self.enabled:
            return False
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError as e:
            self.enabled = False
            log.warning("the multi-process preemption sync point failed (%s): processes can no longer agree on a "
                        "step to save at, so SIGTERM/SIGINT will end the run without a checkpoint", e)
            return False


def _all_finite(tree) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite: numpy leaves on the host,
    ``jax.Array`` leaves where they live, by one small jitted reduction per array (every process
    must call it, in the same order). Per array, because jit then compiles one small program per
    distinct shape, dtype and sharding (42 for the tiny training state), where one program over
    every array of a state compiles a thousand reductions, at the first save of every run."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not all(np.isfinite(np.asarray(x)).all() for x in leaves if not isinstance(x, jax.Array)):
        return False
    # dispatch them all before reading any back: one wait, not one per array
    flags = [_finite_jit(x) for x in leaves if isinstance(x, jax.Array)]
    return all(bool(np.asarray(f.addressable_data(0))) for f in flags)  # replicated: every process holds them


@jax.jit
def _finite_jit(x):
    return jnp.all(jnp.isfinite(x))


def _trained_state(state):
    """What a step updates: parameters and optimizer state (the whole state when it has no such fields)."""
    if hasattr(state, "params") and hasattr(state, "opt_state"):
        return state.params, state.opt_state
    return state


def _iterator_state(data_iter):
    get = getattr(data_iter, "get_state", None)
    return get() if get is not None else None


def _cfg_get(cfg, name, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def train_loop(
    cfg,
    state,
    train_step: Callable,
    data_iter: Iterator,
    ckpt_manager=None,
    writer: metrics_lib.MetricWriter | None = None,
    *,
    num_steps: int,
    save_every: int | None = None,
    log_every: int = 50,
    on_step: Callable[[int, dict], None] | None = None,
    metadata: dict | None = None,
    hooks: Sequence[Callable[[int, Any, dict], None]] = (),
) -> LoopResult:
    """Trains until ``state.step == num_steps`` (an absolute step count).

    ``train_step``: the jitted ``(state, batch) -> (state, metrics)`` (``jit_train_step``);
    ``data_iter``: yields batches the step accepts (host arrays, or global ``jax.Array``s in
    multi-host runs); with ``get_state()/set_state(dict)`` its position is checkpointed and
    restored. ``ckpt_manager``: an ``anim_jax.checkpoint.CheckpointManager`` or None; if it holds
    a checkpoint, the run resumes from the latest one (state and data-iterator position) onto
    ``state``'s shardings. ``writer``: a ``MetricWriter`` or None. After every finished step each
    of ``hooks`` runs as ``hook(step, state, metrics)`` (the new state, valid until the next step
    donates it; host-side float metrics), then ``on_step(step, metrics)``.

    ``cfg`` (optional fields): ``global_batch_size`` (examples per train_step call, for
    examples/s), ``flops_per_step`` (model FLOPs of one call, all devices) and
    ``peak_flops_per_device`` (for MFU; guessed from the device kind when absent).

    Returns a ``LoopResult``; raises ``NonFiniteLossError`` on a NaN/Inf loss or gradient norm, or
    on non-finite parameters / optimizer state at a save (see the module docstring).
    """
    is_main = jax.process_index() == 0
    resumed_from = None
    last_ckpt = None
    if ckpt_manager is not None:
        last_ckpt = ckpt_manager.latest_step()
        if last_ckpt is not None:
            restored = ckpt_manager.restore(last_ckpt, state)
            state = restored.state
            resumed_from = last_ckpt
            if restored.data_iterator_state is not None:
                if not hasattr(data_iter, "set_state"):
                    raise TypeError("the checkpoint holds a data-iterator state but data_iter has no set_state")
                data_iter.set_state(restored.data_iterator_state)
            log.info("resumed from checkpoint step %d", last_ckpt)

    step = int(jax.device_get(state.step))
    if resumed_from is not None and step != resumed_from:
        raise ValueError(f"checkpoint {resumed_from} holds state.step == {step}")

    batch_size = _cfg_get(cfg, "global_batch_size")
    flops = _cfg_get(cfg, "flops_per_step")
    peak = _cfg_get(cfg, "peak_flops_per_device") or metrics_lib.peak_flops_per_device()
    n_dev = jax.device_count()

    def diverged(step_: int, value, name: str, batch=None) -> NonFiniteLossError:
        """The error for a non-finite value at step ``step_``; with ``batch`` (a non-finite loss or
        gradient), deletes the checkpoint of the state that produced it unless the batch is to blame."""
        nonlocal last_ckpt
        cause, discarded = "", None
        if batch is not None and not _all_finite(batch):
            cause = f"the batch of step {step_} holds NaN/Inf values (a data problem: fix the data before resuming)"
        elif batch is not None and ckpt_manager is not None and last_ckpt == step_ - 1:
            log.warning("deleting checkpoint %d: its state gives a non-finite %s on the next batch", last_ckpt, name)
            ckpt_manager.delete(last_ckpt)
            discarded, last_ckpt = last_ckpt, ckpt_manager.latest_step()
        if ckpt_manager is not None:
            ckpt_manager.wait()  # the last good checkpoint is complete on disk
        return NonFiniteLossError(step_, value, name, last_ckpt, cause=cause, discarded_step=discarded)

    def save(step_):
        nonlocal last_ckpt
        if ckpt_manager is None or last_ckpt == step_:
            return
        if not _all_finite(_trained_state(state)):
            raise diverged(step_, "NaN/Inf", "parameters or optimizer state")
        meta = dict(metadata or {}, step=step_, wall_time=time.time())
        ckpt_manager.save(step_, state, _iterator_state(data_iter), meta)  # False: already saved
        last_ckpt = step_

    if flops and not peak:
        log.warning("MFU will not be reported: the peak FLOP/s of a %r is unknown (set train.peak_flops_per_device)",
                    jax.devices()[0].device_kind)
    stop = _StopFlag(multiprocess=jax.process_count() > 1)
    agreement = _PreemptionAgreement(jax.process_count() > 1 and _preemption_service_running())
    window: dict[str, list[float]] = {}
    times: list[float] = []
    status = STATUS_COMPLETED
    calls = 0
    bar = None
    if is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=step, desc="train", dynamic_ncols=True)

    try:
        with stop.installed():
            while step < num_steps:
                t0 = time.perf_counter()  # step_time includes waiting for data: it is what a step costs
                try:
                    batch = next(data_iter)
                except StopIteration:
                    status = STATUS_DATA_EXHAUSTED
                    break
                state, step_metrics = train_step(state, batch)
                host = {k: float(v) for k, v in jax.device_get(step_metrics).items() if np.ndim(v) == 0}
                dt = time.perf_counter() - t0
                for name in ("loss", "grad_norm"):
                    v = host.get(name)
                    if v is not None and not math.isfinite(v):
                        raise diverged(step + 1, v, name, batch)
                step += 1
                calls += 1
                if calls > 1:
                    times.append(dt)  # the first call includes compilation
                for k, v in host.items():
                    window.setdefault(k, []).append(v)
                for hook in hooks:
                    hook(step, state, host)
                if on_step is not None:
                    on_step(step, host)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{host.get('loss', float('nan')):.4g}", refresh=False)
                if step % log_every == 0 or step == num_steps:
                    scalars = {}
                    for k, vs in window.items():
                        finite = [v for v in vs if math.isfinite(v)]
                        if finite:
                            scalars[k] = float(np.mean(finite))
                    if times:
                        st = float(np.mean(times))
                        scalars["step_time"] = st
                        if batch_size:
                            scalars["examples_per_sec"] = batch_size / st
                        if flops and peak:
                            scalars["mfu"] = metrics_lib.mfu(flops, st, peak, n_dev)
                    if writer is not None:
                        writer.write_scalars(step, scalars)
                        writer.flush()
                    window.clear()
                    times.clear()
                if stop.signum is not None or agreement.reached(step):
                    save(step)
                    status = STATUS_PREEMPTED
                    break
                if save_every and step % save_every == 0:
                    save(step)
            if status != STATUS_PREEMPTED:
                save(step)  # no-op when this step is already saved
    finally:
        if ckpt_manager is not None:
            ckpt_manager.wait()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.flush()
    return LoopResult(status, step, state, last_ckpt, stop.signum, resumed_from)
