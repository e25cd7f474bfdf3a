"""Animate Anyone training on tiny models, stage 2 and remat (the stage-1 and command-line tests are
in test_train_animate_anyone.py, whose helpers this file uses; a file of its own so the two test
workers share the load):

* stage 2 changes only the motion-module parameters (bitwise) and lowers the loss;
* remat keeps parameter paths, values and gradients.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anim_jax.models.remat import apply_remat
from anim_jax.train.architecture import component_configs
from anim_jax.train.setup import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_animate_anyone import STAGE1, STAGE2, flat, load, loss_at_step0_key  # noqa: E402


def test_remat_blocks_keep_paths_values_and_gradients(devices):
    """A UNet level (resnet -> transformer) with and without remat; motion modules are wrapped too."""
    from anim_jax.models import factory

    unet3d = factory.build("denoiser", component_configs(load(STAGE2))["denoiser"])
    n_motion = sum(1 for _, m in nnx.iter_graph(unet3d) if type(m).__name__ == "MotionModule")
    n_blocks = sum(1 for _, m in nnx.iter_graph(unet3d) if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel"))
    assert n_motion and apply_remat(unet3d, "dots") == n_motion + n_blocks
    block = factory.build("denoiser", component_configs(load(STAGE1))["denoiser"]).down_blocks[0]
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    remat_block = nnx.merge(graphdef, params, rest)
    assert apply_remat(remat_block, "full") == 2
    rgraphdef, rparams, _ = nnx.split(remat_block, nnx.Param, ...)
    assert jax.tree.structure(rparams) == jax.tree.structure(params)  # same parameter paths
    r = np.random.default_rng(3)
    f = 2
    h = jnp.asarray(r.standard_normal((2 * f, 8, 8, 32)), jnp.float32)
    temb = jnp.asarray(r.standard_normal((2 * f, 128)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((2, 1, 32)), jnp.float32)
    tokens = jnp.asarray(r.standard_normal((2, 64, 32)), jnp.float32)
    ref = {"attentions.0.transformer_blocks.0": block.attentions[0].transformer_blocks[0].attn1.project_kv(tokens)}

    def loss(gd):
        def fn(p):
            out, skips, feats = nnx.merge(gd, p, rest)(h, temb, ctx, num_frames=f, reference=ref)
            return jnp.sum(out**2) + sum(jnp.sum(s) for s in skips) + sum(jnp.sum(x**2) for x in feats.values())
        return fn

    def remat_eqns(jaxpr) -> int:
        n = 0
        for e in jaxpr.eqns:
            n += e.primitive.name in ("remat2", "checkpoint")
            n += sum(remat_eqns(getattr(sub, "jaxpr", sub)) for sub in jax.extend.core.jaxprs_in_params(e.params))
        return n

    assert remat_eqns(jax.make_jaxpr(loss(rgraphdef))(params).jaxpr) == 2
    assert remat_eqns(jax.make_jaxpr(loss(graphdef))(params).jaxpr) == 0
    (v0, g0), (v1, g1) = [jax.jit(jax.value_and_grad(loss(gd)))(params) for gd in (graphdef, rgraphdef)]
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # recomputation reorders float32 sums
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(np.abs(b).max()) + 1e-7)
    with pytest.raises(ValueError, match="remat policy"):
        apply_remat(remat_block, "everything")


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------


def test_stage2_changes_only_motion_modules_and_lowers_the_loss(devices):
    # motion modules at one UNet level (the tiny recipe has two and the mid block): the same code
    # paths, and the step compiles in ~24% less time
    cfg = load(STAGE2, "--config.data.batch_size=2", "--config.mesh.num_devices=2", "--config.model.motion.levels=(1,)",
               "--config.model.motion.use_mid_block=False")
    trainer = setup(cfg)
    state = trainer.state
    trained = set(flat(state.params))
    assert trained and all(".motion_modules." in p and p.startswith("denoiser.") for p in trained)
    r = np.random.default_rng(2)
    batch = trainer.put_batch({k: r.integers(0, 256, v.shape).astype(np.uint8) for k, v in trainer.batch_spec.items()})
    before_model = flat(state.model())
    before = loss_at_step0_key(trainer, state, batch)
    for _ in range(6):
        state, _ = trainer.train_step(state, batch)
    after = loss_at_step0_key(trainer, state, batch)
    after_model = flat(state.model())
    assert before_model.keys() == after_model.keys()
    changed = {p for p in before_model if not np.array_equal(before_model[p], after_model[p])}
    unchanged_motion = {p for p in before_model if ".motion_modules." in p} - changed
    assert changed and changed <= trained, sorted(changed - trained)[:5]
    # Every motion-module parameter moves except those gated by a zero proj_out on the first step.
    assert len(unchanged_motion) < len(trained) // 4, sorted(unchanged_motion)[:5]
    for p in before_model:
        if ".motion_modules." not in p:
            np.testing.assert_array_equal(before_model[p], after_model[p], err_msg=p)
    assert after < before, (before, after)
