"""Multi-process start-up (``jax.distributed``) from the environment, and global batches.

``maybe_initialize_distributed()`` must run before anything touches a JAX backend. What it does,
first match wins:

1. ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set:
   initialise with exactly these (cluster auto-detection off; ``JAX_LOCAL_DEVICE_IDS``, read by
   JAX itself, restricts the process to some local GPUs). ``JAX_NUM_PROCESSES=1``: nothing to do.
   This is what ``launch/slurm_gpu.sbatch`` and ``launch/local.sh`` set.
2. A SLURM job step with more than one task (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
   ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``, ``SLURM_LOCALID``): JAX's SLURM detection (coordinator
   = first node of the step, port derived from the job id or ``JAX_COORDINATOR_PORT``; JAX then
   binds each process to local GPU ``SLURM_LOCALID``: one task per GPU).
3. A Cloud TPU VM (``libtpu`` installed and TPU chips present): JAX's TPU detection, which asks
   the VM's metadata server for the workers of the slice (harmless on a single-host slice).
4. Otherwise: a single process; nothing happens.

``ANIM_JAX_DISTRIBUTED=0`` disables all of it.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from typing import Mapping

import jax

log = logging.getLogger(__name__)

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _on_tpu_vm() -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def distributed_plan(env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments ``maybe_initialize_distributed`` would pass to
    ``jax.distributed.initialize``, or None for a single process (no side effects)."""
    env = os.environ if env is None else env
    if env.get("ANIM_JAX_DISTRIBUTED", "1").lower() in ("0", "false", "no"):
        return None
    if all(k in env for k in _EXPLICIT):
        n, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        if n <= 1:
            return None
        if not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={n})")
        return dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=n,
            process_id=pid,
            cluster_detection_method="deactivate",
        )
    if any(k in env for k in _EXPLICIT):
        missing = [k for k in _EXPLICIT if k not in env]
        raise ValueError(f"incomplete multi-process environment: {', '.join(missing)} not set")
    if all(k in env for k in _SLURM) and int(env["SLURM_NTASKS"]) > 1:
        return dict(cluster_detection_method="slurm")
    if env is os.environ and _on_tpu_vm():
        return dict()
    return None


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def maybe_initialize_distributed(*, initialization_timeout: int = 300) -> bool:
    """Initialises ``jax.distributed`` when the environment describes a multi-process run (see the
    module docstring). Returns True when this process is part of an initialised cluster."""
    if is_initialized():
        return True
    plan = distributed_plan()
    if plan is None:
        return False
    log.info("jax.distributed.initialize(%s)", plan)
    jax.distributed.initialize(**plan, initialization_timeout=initialization_timeout)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def process_batch_slice(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
    """The rows of the global batch whose data this process must supply under ``sharding`` (its
    devices' shards along the leading axis; they must form one contiguous block). Use it to pick
    the per-host part of the data, e.g. ``batch[s]`` or the host's share of a Grain pipeline."""
    ndim = max(len(getattr(sharding, "spec", ())), 1)  # only the leading axis may be sharded
    shape = (global_batch_size,) + (1,) * (ndim - 1)
    rows = set()
    for idx in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = idx[0].indices(global_batch_size)
        rows.update(range(start, stop))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(f"this process's rows of the batch are not contiguous under {sharding}")
    return slice(lo, hi)


def global_batch(local_batch, sharding):
    """Assembles each process's part of the batch (the rows ``process_batch_slice`` names) into
    global ``jax.Array``s. ``sharding``: one ``Sharding`` for every leaf, or a pytree of them."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
    return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, x), sharding, local_batch)
