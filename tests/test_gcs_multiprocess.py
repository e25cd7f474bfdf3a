"""Two processes on localhost (the setup of test_multiprocess_train.py) checkpoint to a gs:// bucket
on the emulator (tests/gcs_emulator.py) and resume from it.

Each worker trains ``SAVE_AT`` steps and saves into the bucket (every process writes its own array
shards and iterator state; process 0 the shared metadata), then starts over from a freshly
initialised state and a new checkpoint manager, which must resume from the bucket's checkpoint and
train on to ``NUM_STEPS``. The test compares the bucket's last checkpoint with the same steps run
in its own single process.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gcs_emulator import BUCKET, gcs  # noqa: E402,F401 - gcs is the module-scoped emulator fixture

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 180
SAVE_AT, NUM_STEPS = 2, 4


def worker(ckpt_dir: str) -> int:
    from anim_jax.train import distributed

    assert distributed.maybe_initialize_distributed(initialization_timeout=60)
    import jax

    from anim_jax import parallel
    from anim_jax.checkpoint import CheckpointManager
    from anim_jax.train.loop import STATUS_COMPLETED, train_loop
    from test_multiprocess_train import MESH, _build, _GlobalData

    mesh = parallel.make_mesh(*MESH)
    _, _, state, step, shardings = _build(mesh)
    with CheckpointManager(ckpt_dir) as cm:
        res = train_loop(None, state, step, _GlobalData(shardings), cm, None, num_steps=SAVE_AT, save_every=SAVE_AT, log_every=100)
    assert res.status == STATUS_COMPLETED and res.last_checkpoint_step == SAVE_AT and res.resumed_from is None
    # A new start (as after a preemption): fresh parameters and iterator, resumed from the bucket.
    _, _, fresh, _, _ = _build(mesh)
    data = _GlobalData(shardings)
    with CheckpointManager(ckpt_dir) as cm:
        res = train_loop(None, fresh, step, data, cm, None, num_steps=NUM_STEPS, save_every=SAVE_AT, log_every=100)
    assert res.status == STATUS_COMPLETED and res.resumed_from == SAVE_AT and data.i == NUM_STEPS, (res, data.i)
    print(f"process {jax.process_index()} resumed from {res.resumed_from} to {res.step}", flush=True)
    jax.distributed.shutdown()
    return 0


def test_two_processes_checkpoint_to_and_resume_from_a_bucket(gcs, devices):
    import fsspec
    import jax
    import numpy as np

    from anim_jax import parallel
    from anim_jax.checkpoint import CheckpointManager
    from anim_jax.train import state as train_state
    from helpers import run_local_processes
    from test_multiprocess_train import GLOBAL_BATCH, MESH, _build
    from test_train_infra import make_batch

    ckpt_dir = f"gs://{BUCKET}/mp/checkpoints"
    # the processes inherit this one's environment, the emulator's variables included
    outputs = run_local_processes([sys.executable, os.path.abspath(__file__), ckpt_dir], timeout=TIMEOUT_S, cwd=HERE)
    for pid, out in enumerate(outputs):
        assert f"process {pid} resumed from {SAVE_AT} to {NUM_STEPS}" in out, out[-5000:]

    fs = fsspec.filesystem("gs")
    for pid in range(2):  # each process wrote its own iterator state, both steps committed
        f = f"{BUCKET}/mp/checkpoints/{NUM_STEPS}/data_iter/process_{pid}-of-2.json"
        assert json.loads(fs.cat(f)) == {"value": {"i": NUM_STEPS}}
    mesh = parallel.make_mesh(*MESH)
    _, _, state, step, _ = _build(mesh)
    for i in range(NUM_STEPS):
        state, _ = step(state, make_batch(i, GLOBAL_BATCH))
    with CheckpointManager(ckpt_dir) as cm:
        assert cm.all_steps() == [SAVE_AT, NUM_STEPS]
        r = cm.restore(NUM_STEPS, train_state.abstract_like(state), data_iterator=False)
    assert int(r.state.step) == NUM_STEPS
    for a, b in zip(jax.tree.leaves(jax.device_get(r.state.params)), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(worker(sys.argv[1]))
