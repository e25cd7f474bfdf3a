"""One training step (tiny stage-1 recipe, 8 fake devices, same seed and batch) on meshes of
different shapes, and in bfloat16 compute against float32; the numbers are in docs/numerics.md.

* data-parallel (data=8) against fully sharded (fsdp=8): the same loss, gradient norms, gradients
  (read back exactly from Adam's first moment, which after one step is 0.1 x the clipped gradient)
  and updated parameters, within float32 reduction-order differences;
* bfloat16 compute (activations, and the frozen VAE/CLIP stored in bf16, as the full-size recipe
  runs) against float32 on the fsdp mesh: loss and per-network gradient norms within stated bounds.

Three compilations of the 8-way step in all (fp32 on two meshes, bf16 on one), one step each, at
XLA's backend optimisation level 0, which compiles the 8-way step in 33.5 s instead of 38.5 s
(benchmarks/RESULTS.md, "Training"); every program here is compiled the same way, so each
comparison is between equals. The level is not neutral for bf16 (the default also drops redundant
float conversions): docs/numerics.md gives the bf16 numbers at both levels.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import optax
import pytest

from anim_jax import configlib
from anim_jax.train.setup import setup
from tolerance import Tol, assert_close, used

STAGE1 = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "stage1.py") + ":tiny"
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1)}
# Reached (docs/numerics.md): loss, mse and gradient norms (global and per network) agree to 4e-7
# relative; gradients to 0.091 of the bound below.
# After one Adam step an update is ~lr x sign(g), so a gradient entry within rounding of 0 may flip
# its step: updated parameters agree within 2 lr (reached 0.075 lr).
SCALAR_RTOL = 4e-6
GRAD_TOL_FRACTION = 2e-6  # per element: atol = this x max|g|, rtol = 1e-4
# bf16 vs fp32 (reached: loss 0.01%, gradient norms 0.02% (ReferenceNet) to 0.25% (PoseGuider)): ~4x.
BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL = 1.5e-3, 1e-2


FAST_COMPILE = {"xla_backend_optimization_level": "0"}


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _one_step(mesh_shape, compute_dtype="float32"):
    overrides = [f"--config.model.compute_dtype={compute_dtype}"]
    if compute_dtype == "bfloat16":
        overrides.append("--config.model.frozen_dtype=bfloat16")
    cfg = configlib.load_config(STAGE1, overrides)
    with cfg.unlocked():
        cfg.mesh.shape = mesh_shape
    trainer = setup(cfg)
    rng = np.random.default_rng(5)
    batch = trainer.put_batch({k: rng.integers(0, 256, v.shape).astype(np.uint8) for k, v in trainer.batch_spec.items()})
    before = _host(trainer.state.params)
    state, metrics = trainer.lower().compile(compiler_options=FAST_COMPILE)(trainer.state, batch)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    return dict(metrics=_host(metrics), before=before, after=_host(state.params), mu=_host(mu),
                lr=float(cfg.optimizer.lr), mesh=dict(trainer.mesh.shape))


@pytest.fixture(scope="module")
def steps(devices):
    return {name: _one_step(shape) for name, shape in MESHES.items()}


def test_training_step_is_the_same_on_data_and_fsdp_meshes(steps):
    a, b = steps["data"], steps["fsdp"]
    assert a["mesh"]["data"] == 8 and b["mesh"]["fsdp"] == 8
    jax.tree.map(np.testing.assert_array_equal, a["before"], b["before"])  # same start
    scalars = {k: abs(b["metrics"][k] - v) / abs(v) for k, v in a["metrics"].items()
               if k.startswith(("loss", "grad_norm", "mse", "snr_weight")) and np.isfinite(v) and v}
    flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(s["mu"])[0]) for s in (a, b))
    scale = max(float(np.abs(g).max()) for g in flat_a.values())
    grad_tol = Tol(rtol=1e-4, atol=GRAD_TOL_FRACTION * scale)
    grads_used = max(used(flat_b[p], g, grad_tol) for p, g in flat_a.items())
    leaves = [jax.tree.leaves(t) for t in (a["after"], b["after"], a["before"])]
    param_diff = max(float(np.abs(pa - pb).max()) for pa, pb in zip(leaves[0], leaves[1]))
    moved = max(float(np.abs(pa - p0).max()) for pa, p0 in zip(leaves[0], leaves[2]))
    print(f"data=8 vs fsdp=8: scalars max rel diff {max(scalars.values()):.2g} ({max(scalars, key=scalars.get)}); "
          f"gradients used {grads_used:.2g} of their tolerance; updated params max |d| {param_diff / a['lr']:.3g} lr")
    for k, r in scalars.items():
        assert r <= SCALAR_RTOL, (k, a["metrics"][k], b["metrics"][k])
    for path, g in flat_a.items():
        assert_close(flat_b[path], g, grad_tol, f"gradient (Adam mu) {jax.tree_util.keystr(path)}, fsdp vs data")
    assert param_diff <= 2 * a["lr"] + 1e-7
    assert moved > 0.5 * a["lr"]  # the step did move the parameters


def test_bf16_training_step_is_close_to_fp32(steps):
    ref, got = steps["fsdp"]["metrics"], _one_step(MESHES["fsdp"], "bfloat16")["metrics"]
    print("bf16 vs fp32 training step: " + ", ".join(
        f"{k} {got[k]:.6g} vs {ref[k]:.6g} ({abs(got[k] - ref[k]) / abs(ref[k]):.2%})"
        for k in sorted(ref) if k.startswith(("loss", "grad_norm")) and np.isfinite(ref[k])))
    assert np.isfinite(got["loss"]) and got["loss"] != ref["loss"]  # bf16 was in effect
    assert abs(got["loss"] - ref["loss"]) <= BF16_LOSS_RTOL * abs(ref["loss"])
    norms = [k for k in ref if k.startswith("grad_norm")]
    assert len(norms) == 4  # global and one per trained network
    for k in norms:
        assert abs(got[k] - ref[k]) <= BF16_GRAD_NORM_RTOL * ref[k], (k, got[k], ref[k])
