"""A real two-process run on localhost: jax.distributed with CPU (gloo) collectives, a global
8-device mesh over 2 processes x 4 CPU devices, sharded training and a collective Orbax save.

The test spawns this file twice as a worker (``python test_multiprocess_train.py WORKDIR``) with
the JAX_* environment ``launch/local.sh`` would set and waits at most ``TIMEOUT_S``. Each worker
trains ``NUM_STEPS`` steps and saves, then trains on until process 1 alone is interrupted: both
must stop and save at the same agreed step. The test restores the first checkpoint in its own
(single) process and compares it with the same steps run there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 120
NUM_STEPS = 3
STOP_AT = 5
GLOBAL_BATCH = 16
MESH = ((2, 4), ("data", "fsdp"))


def _build(mesh):
    """Model, optimizer, state and jitted step, identical in the workers and the test process."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from anim_jax import parallel
    from anim_jax.train import optim
    from anim_jax.train import state as train_state

    sys.path.insert(0, HERE)
    from test_train_infra import Toy, mse_loss, opt_cfg

    tx = optim.make_optimizer(opt_cfg(lr=1e-2))
    model = Toy(nnx.Rngs(0))
    mask = optim.trainable_mask(model, exclude=[r"^conv1\."])
    state = train_state.create_train_state(model, tx, mask, mesh, frozen_dtype=jnp.bfloat16, rng=3)
    shardings = {"x": parallel.batch_sharding(mesh, 4), "y": parallel.batch_sharding(mesh, 2)}
    step = train_state.jit_train_step(train_state.make_train_step(mse_loss, tx), state, shardings)
    del jax
    return tx, mask, state, step, shardings


class _GlobalData:
    """Each process loads only its rows of the deterministic global batch ``make_batch(i, 16)``."""

    def __init__(self, shardings):
        from anim_jax.train import distributed

        self.shardings = shardings
        self.rows = distributed.process_batch_slice(shardings["x"], GLOBAL_BATCH)
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        from anim_jax.train import distributed
        from test_train_infra import make_batch

        local = {k: v[self.rows] for k, v in make_batch(self.i, GLOBAL_BATCH).items()}
        self.i += 1
        return distributed.global_batch(local, self.shardings)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def worker(workdir: str) -> int:
    from anim_jax.train import distributed

    assert distributed.maybe_initialize_distributed(initialization_timeout=60)
    import jax

    from anim_jax import parallel
    from anim_jax.checkpoint import CheckpointManager
    from anim_jax.train.loop import STATUS_COMPLETED, train_loop

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    mesh = parallel.make_mesh(*MESH)
    _, _, state, step, shardings = _build(mesh)
    data = _GlobalData(shardings)
    losses = []
    with CheckpointManager(os.path.join(workdir, "ckpt")) as cm:
        res = train_loop(None, state, step, data, cm, None, num_steps=NUM_STEPS, save_every=NUM_STEPS,
                         log_every=100, on_step=lambda s, m: losses.append(m["loss"]))
    assert res.status == STATUS_COMPLETED and res.last_checkpoint_step == NUM_STEPS
    print(f"process {jax.process_index()} rows {data.rows} losses {losses}", flush=True)

    # Preemption: process 1 alone gets a SIGINT at step STOP_AT; the loop turns it into a
    # SIGTERM for JAX's coordination service, and both processes must stop and save at one step.
    def on_step(s, m):
        if jax.process_index() == 1 and s == STOP_AT:
            os.kill(os.getpid(), signal.SIGINT)

    with CheckpointManager(os.path.join(workdir, "ckpt")) as cm:
        res = train_loop(None, res.state, step, data, cm, None, num_steps=200, log_every=100, on_step=on_step)
    print(f"process {jax.process_index()} stopped {res.status} at {res.step} ckpt {res.last_checkpoint_step}",
          flush=True)
    jax.distributed.shutdown()
    return 0


def test_two_process_training_and_checkpoint(devices, tmp_path):
    import jax
    import numpy as np

    from anim_jax import parallel
    from anim_jax.checkpoint import CheckpointManager
    from anim_jax.train import state as train_state

    from helpers import run_local_processes

    outputs = run_local_processes([sys.executable, os.path.abspath(__file__), tmp_path], timeout=TIMEOUT_S, cwd=HERE)
    assert "process 0 rows" in outputs[0] and "process 1 rows" in outputs[1]
    stops = [re.search(r"stopped (\w+) at (\d+) ckpt (\d+)", out) for out in outputs]
    assert all(stops), outputs
    assert {m.group(1) for m in stops} == {"preempted"}
    stop_step = int(stops[0].group(2))
    assert stop_step > STOP_AT and all(int(m.group(2)) == int(m.group(3)) == stop_step for m in stops)

    # The reference: the same steps in this (single) process on an 8-device mesh of the same shape.
    mesh = parallel.make_mesh(*MESH)
    tx, mask, state, step, _ = _build(mesh)
    from test_train_infra import make_batch

    for i in range(NUM_STEPS):
        state, m = step(state, make_batch(i, GLOBAL_BATCH))
    with CheckpointManager(tmp_path / "ckpt") as cm:
        assert cm.all_steps() == [NUM_STEPS, stop_step]
        # Each worker stored its own iterator position; this process count (1) has none.
        r = cm.restore(NUM_STEPS, train_state.abstract_like(state), data_iterator=False)
    assert r.step == NUM_STEPS and int(r.state.step) == NUM_STEPS and r.data_iterator_state is None
    for pid in range(2):
        f = tmp_path / "ckpt" / str(NUM_STEPS) / "data_iter" / f"process_{pid}-of-2.json"
        assert json.loads(f.read_text()) == {"value": {"i": NUM_STEPS}}
    got, want = jax.device_get(r.state), jax.device_get(state)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got.frozen), jax.tree.leaves(want.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(worker(sys.argv[1]))
