"""Model-agnostic training infrastructure on a toy NNX model: optimizer, train state and step,
Orbax checkpoints, the loop (resume, SIGTERM, NaN), TensorBoard event files, distributed setup."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anim_jax import parallel
from anim_jax.checkpoint import CheckpointManager
from anim_jax.models import layers
from anim_jax.train import distributed, metrics, optim
from anim_jax.train import state as train_state
from anim_jax.train.loop import (
    STATUS_COMPLETED,
    STATUS_PREEMPTED,
    NonFiniteLossError,
    train_loop,
)

# ---------------------------------------------------------------------------------------------
# A toy model, data and loss
# ---------------------------------------------------------------------------------------------


class Toy(nnx.Module):
    """Two convs and a linear head; conv2 (8 in-channels) and head (16 in) shard over 8 devices."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = layers.Conv2d(3, 8, rngs=rngs)
        self.conv2 = layers.Conv2d(8, 16, rngs=rngs)
        self.head = layers.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.silu(self.conv1(x))
        x = jax.nn.silu(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))


W_TRUE = np.random.default_rng(123).standard_normal((3, 4)).astype(np.float32)


def make_batch(i: int, batch: int = 8, seed: int = 0) -> dict:
    r = np.random.default_rng((seed, i))
    x = r.standard_normal((batch, 6, 6, 3)).astype(np.float32)
    return {"x": x, "y": x.mean(axis=(1, 2)) @ W_TRUE * 3.0}


class ToyData:
    """A deterministic iterator with Grain's get_state/set_state protocol."""

    def __init__(self, batch: int = 8, nan_at: int | None = None):
        self.i = 0
        self.batch = batch
        self.nan_at = nan_at

    def __iter__(self):
        return self

    def __next__(self):
        b = make_batch(self.i, self.batch)
        if self.nan_at is not None and self.i == self.nan_at:
            b["x"] = np.full_like(b["x"], np.nan)
        self.i += 1
        return b

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = int(s["i"])


def loss_fn(model, batch, rng):
    pred = model(batch["x"])
    noise = 1e-3 * jax.random.normal(rng, pred.shape)  # uses the per-step key: resume must replay it
    loss = jnp.mean((pred + noise - batch["y"]) ** 2)
    return loss, {"pred_abs": jnp.abs(pred).mean()}


def opt_cfg(**kw):
    cfg = optim.default_config()
    cfg.update(dict(lr=3e-3, warmup_steps=2), **kw)
    return cfg


def mse_loss(model, batch, rng):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


@functools.lru_cache(maxsize=None)
def _optimizer_and_step(mesh, cfg_items, exclude, frozen_dtype, loss, compute_dtype):
    """One jitted step per configuration, so tests share compilations (jit caches per function)."""
    tx = optim.make_optimizer(dict(cfg_items))
    model = Toy(nnx.Rngs(0))
    mask = optim.trainable_mask(model, exclude=exclude)
    state = train_state.create_train_state(model, tx, mask, mesh, frozen_dtype=frozen_dtype)
    bs = {"x": parallel.batch_sharding(mesh, 4), "y": parallel.batch_sharding(mesh, 2)}
    step = train_state.make_train_step(loss, tx, compute_dtype=compute_dtype)
    return tx, mask, train_state.jit_train_step(step, state, bs)


def setup(mesh, cfg=None, *, exclude=(), frozen_dtype=None, seed=0, loss=loss_fn, compute_dtype=None):
    cfg = cfg if cfg is not None else opt_cfg()
    tx, mask, step = _optimizer_and_step(
        mesh, tuple(sorted(cfg.items())), tuple(exclude), frozen_dtype, loss, compute_dtype
    )
    state = train_state.create_train_state(Toy(nnx.Rngs(seed)), tx, mask, mesh, frozen_dtype=frozen_dtype, rng=7)
    return state, step, tx, mask


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(host(a))[0], jax.tree_util.tree_flatten_with_path(host(b))[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(p)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


@pytest.fixture(scope="module")
def mesh8(devices):
    return parallel.make_mesh((8,), ("fsdp",))


@pytest.fixture(scope="module")
def mesh24(devices):
    return parallel.make_mesh((2, 4), ("data", "fsdp"))


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def test_optimizer_defaults_are_moores_and_match_torch_adamw():
    import torch

    cfg = optim.default_config()
    assert (cfg.lr, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.grad_clip_norm, cfg.grad_accum_steps) == (
        1e-5, 0.9, 0.999, 1e-8, 1e-2, 1.0, 1,
    )
    tx = optim.make_optimizer(cfg)
    r = np.random.default_rng(0)
    p0 = {"w": r.standard_normal((5, 3)).astype(np.float32), "b": r.standard_normal(3).astype(np.float32)}
    opt_state = tx.init(jax.tree.map(jnp.asarray, p0))
    hp = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")) if hasattr(s, "hyperparams")]
    assert len(hp) == 1
    got = {k: float(v) for k, v in hp[0].hyperparams.items()}
    assert got["b1"] == pytest.approx(0.9) and got["b2"] == pytest.approx(0.999)
    assert got["eps"] == pytest.approx(1e-8) and got["weight_decay"] == pytest.approx(1e-2)
    assert got["learning_rate"] == pytest.approx(1e-5)

    # Same updates as torch.optim.AdamW + clip_grad_norm_(1.0) (Moore's training loop), with
    # gradients large enough that clipping is active; a larger lr (otherwise the defaults) makes
    # weight decay visible above float32 rounding.
    cfg.lr = 1e-2
    tx = optim.make_optimizer(cfg)
    opt_state = tx.init(jax.tree.map(jnp.asarray, p0))
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
    topt = torch.optim.AdamW(list(tp.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    params = jax.tree.map(jnp.asarray, p0)
    for i in range(3):
        g = {k: (10.0 * r.standard_normal(v.shape)).astype(np.float32) for k, v in p0.items()}
        for k in tp:
            tp[k].grad = torch.from_numpy(g[k].copy())
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        topt.step()
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)
    for k in p0:
        np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(), rtol=0, atol=1e-6)


def test_warmup_and_cosine_schedules():
    sched = optim.make_schedule(opt_cfg(lr=1e-3, warmup_steps=4))
    np.testing.assert_allclose([float(sched(i)) for i in range(6)], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    constant = optim.make_schedule(opt_cfg(lr=1e-3, warmup_steps=1))  # Moore: warmup 1 == constant
    assert [float(constant(i)) for i in range(3)] == pytest.approx([1e-3] * 3)
    cos = optim.make_schedule(opt_cfg(lr=1e-3, warmup_steps=2, schedule="cosine", total_steps=12, min_lr_ratio=0.1))
    assert float(cos(1)) == pytest.approx(1e-3)
    assert float(cos(7)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)  # half-way through the decay
    assert float(cos(12)) == pytest.approx(1e-4, rel=1e-5) and float(cos(50)) == pytest.approx(1e-4, rel=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(opt_cfg(schedule="linear"))


def test_trainable_mask_selects_by_path():
    model = Toy(nnx.Rngs(0))
    m = optim.mask_tree(model, optim.trainable_mask(model, include=[r"^conv"], exclude=[r"conv2\.bias"]))
    assert m == {
        "conv1": {"bias": True, "kernel": True},
        "conv2": {"bias": False, "kernel": True},
        "head": {"bias": False, "kernel": False},
    }
    with pytest.raises(ValueError, match="motion_modules"):
        optim.trainable_mask(model, include=[r"motion_modules"])  # a typo must not freeze everything
    with pytest.raises(ValueError, match="reference_net"):
        optim.trainable_mask(model, exclude=[r"reference_net\.up_blocks\.3"])


def test_gradient_accumulation_equals_big_batch(mesh8):
    b1, b2 = make_batch(0, 8), make_batch(1, 8)
    big = {k: np.concatenate([b1[k], b2[k]]) for k in b1}
    s_acc, step_acc, _, _ = setup(mesh8, opt_cfg(grad_accum_steps=2), loss=mse_loss)
    s_big, step_big, _, _ = setup(mesh8, opt_cfg(), loss=mse_loss)
    p0 = host(s_acc.params)
    s_acc, _ = step_acc(s_acc, b1)
    assert_trees_equal(s_acc.params, p0)  # no update until the k-th micro-batch
    s_acc, _ = step_acc(s_acc, b2)
    s_big, _ = step_big(s_big, big)
    for a, b in zip(jax.tree.leaves(host(s_acc.params)), jax.tree.leaves(host(s_big.params))):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)  # lr 3e-3 * 0.5 (warm-up) moves ~1.5e-3
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(host(s_big.params)), jax.tree.leaves(p0)))
    assert moved > 1e-4


def test_frozen_params_bitwise_unchanged_and_have_no_optimizer_state(mesh8):
    state, step, _, _ = setup(mesh8, exclude=[r"^conv2\."], frozen_dtype=jnp.bfloat16)
    assert set(state.params) == {"conv1", "head"} and set(state.frozen) == {"conv2"}
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.frozen))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert not any("conv2" in p for p in opt_paths)
    n_params = len(jax.tree.leaves(state.params))
    assert sum("mu" in p for p in opt_paths) == n_params and sum("nu" in p for p in opt_paths) == n_params
    # FSDP placement: the head kernel (16, 4) is split over the 8-way fsdp axis, its moments too.
    assert state.params["head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    mu_head = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if "mu" in jax.tree_util.keystr(p) and "head" in jax.tree_util.keystr(p) and x.ndim == 2]
    assert mu_head and mu_head[0].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    frozen0, params0 = host(state.frozen), host(state.params)
    for i in range(3):
        state, m = step(state, make_batch(i))
    assert_trees_equal(state.frozen, frozen0)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(params0)))
    assert int(state.step) == 3 and set(m) >= {"loss", "grad_norm", "lr", "pred_abs"}


def test_compute_dtype_casts_for_the_model_and_keeps_float32_masters(mesh8):
    seen = {}

    def bf16_loss(model, batch, rng):
        seen.update({k: v[...].dtype for k, v in (("conv1", model.conv1.kernel), ("conv2", model.conv2.kernel))})
        pred = model(batch["x"].astype(jnp.bfloat16))
        return jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2), {}

    state, step, _, _ = setup(mesh8, exclude=[r"^conv2\."], loss=bf16_loss, compute_dtype=jnp.bfloat16)
    p0 = host(state.params)
    state, m = step(state, make_batch(0))
    assert seen == {"conv1": jnp.bfloat16, "conv2": jnp.bfloat16}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.frozen))  # frozen_dtype=None: as built
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert not np.array_equal(host(state.params)["head"]["kernel"], p0["head"]["kernel"])


def test_loss_decreases_on_toy_regression(mesh24):
    state, step, _, _ = setup(mesh24, opt_cfg(lr=1e-2, warmup_steps=1))
    batch = make_batch(0, 16)
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.3 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_restore_onto_other_mesh_shapes(mesh8, mesh24, tmp_path):
    state, step, tx, mask = setup(mesh8, exclude=[r"^conv1\."], frozen_dtype=jnp.bfloat16)
    for i in range(2):
        state, _ = step(state, make_batch(i))
    with CheckpointManager(tmp_path / "ckpt") as cm:
        cm.save(2, state, {"i": 2}, {"config": {"lr": 3e-3}})
        cm.wait()
        expected = host(state)
        mesh1 = parallel.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
        for mesh in (mesh24, mesh1):
            target = train_state.abstract_train_state(lambda: Toy(nnx.Rngs(99)), tx, mask, mesh, frozen_dtype=jnp.bfloat16)
            r = cm.restore(None, target)
            assert r.step == 2 and r.data_iterator_state == {"i": 2} and r.metadata == {"config": {"lr": 3e-3}}
            assert_trees_equal(r.state, expected)
            for got, want in zip(jax.tree.leaves(train_state.state_shardings(r.state)),
                                 jax.tree.leaves(train_state.state_shardings(target))):
                assert got == want
        assert r.state.params["head"]["kernel"].sharding.mesh.shape == {"fsdp": 1}
        # The restored state is usable: one more step on the 1-device mesh.
        step1 = train_state.jit_train_step(train_state.make_train_step(loss_fn, tx), r.state,
                                           parallel.replicated(mesh1))
        s1, m1 = step1(r.state, make_batch(2))
        assert np.isfinite(float(m1["loss"])) and int(s1.step) == 3


def test_uncommitted_checkpoint_is_ignored(mesh8, tmp_path):
    state, _, _, _ = setup(mesh8)
    d = tmp_path / "ckpt"
    with CheckpointManager(d) as cm:
        cm.save(3, state, {"i": 3})
    shutil.copytree(d / "3", d / "7")
    os.remove(d / "7" / "commit_success.txt")  # as if the writer died before committing step 7
    with CheckpointManager(d) as cm:
        assert cm.latest_step() == 3 and cm.all_steps() == [3]
        assert cm.restore(None, state).step == 3
        assert cm.save(7, state, {"i": 7})  # the partial step 7 is overwritten, not an error
        cm.wait()
        assert cm.all_steps() == [3, 7]


def test_checkpoint_without_frozen_params_takes_them_from_the_target(mesh8, tmp_path):
    state, _, tx, mask = setup(mesh8, exclude=[r"^conv2\."])
    with CheckpointManager(tmp_path / "ckpt", include_frozen=False) as cm:
        cm.save(0, state)
        cm.wait()
        assert set(cm.restore(0).state) == {"step", "params", "opt_state", "rng"}  # as saved
        other, _, _, _ = setup(mesh8, exclude=[r"^conv2\."], seed=5)
        r = cm.restore(0, other)
        assert_trees_equal(r.state.params, state.params)
        assert_trees_equal(r.state.frozen, other.frozen)  # not in the checkpoint: the target's own
        assert not np.array_equal(host(other.frozen)["conv2"]["kernel"], host(state.frozen)["conv2"]["kernel"])
        abstract = train_state.abstract_like(other)
        with pytest.raises(ValueError, match="frozen parameters are not checkpointed"):
            cm.restore(0, abstract)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def test_resume_is_bitwise_exact(mesh8, tmp_path):
    n = 3
    straight_losses = []
    state, step, _, _ = setup(mesh8)
    res = train_loop(None, state, step, ToyData(), None, None, num_steps=2 * n, log_every=100,
                     on_step=lambda s, m: straight_losses.append(m["loss"]))
    straight = host(res.state)
    assert res.status == STATUS_COMPLETED and res.step == 2 * n

    ckpt = tmp_path / "ckpt"
    state, step, _, _ = setup(mesh8)
    with CheckpointManager(ckpt) as cm:
        first = train_loop(None, state, step, ToyData(), cm, None, num_steps=n, save_every=n, log_every=100)
    assert first.last_checkpoint_step == n and first.resumed_from is None
    resumed_losses = []
    state, step, _, _ = setup(mesh8, seed=42)  # different init: everything must come from the checkpoint
    data = ToyData()
    with CheckpointManager(ckpt) as cm:
        second = train_loop(None, state, step, data, cm, None, num_steps=2 * n, save_every=n, log_every=100,
                            on_step=lambda s, m: resumed_losses.append(m["loss"]))
        assert cm.all_steps() == [n, 2 * n]
    assert second.resumed_from == n and second.step == 2 * n and data.i == 2 * n
    assert resumed_losses == straight_losses[n:]
    assert_trees_equal(second.state, straight)


def test_hooks_get_each_steps_state_and_metrics(mesh8):
    state, step, _, _ = setup(mesh8)
    seen = []
    res = train_loop(None, state, step, ToyData(), None, None, num_steps=3, log_every=100,
                     hooks=[lambda s, st, m: seen.append((s, int(jax.device_get(st.step)), m["loss"]))])
    assert res.step == 3 and [x[:2] for x in seen] == [(1, 1), (2, 2), (3, 3)]
    assert all(np.isfinite(x[2]) for x in seen) and len({x[2] for x in seen}) == 3


def test_sigterm_saves_at_the_current_step_and_returns(mesh8, tmp_path):
    state, step, _, _ = setup(mesh8)
    previous = signal.getsignal(signal.SIGTERM)

    def on_step(s, m):
        if s == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with CheckpointManager(tmp_path / "ckpt") as cm:
        res = train_loop(None, state, step, ToyData(), cm, None, num_steps=10, save_every=100, log_every=100,
                         on_step=on_step)
        assert res.status == STATUS_PREEMPTED and res.signal == signal.SIGTERM
        assert res.step == 3 and res.last_checkpoint_step == 3 and cm.all_steps() == [3]
        r = cm.restore(3, res.state)
        assert r.data_iterator_state == {"i": 3} and int(r.state.step) == 3
    assert signal.getsignal(signal.SIGTERM) == previous


def test_nan_batch_stops_and_keeps_last_good_checkpoint(mesh8, tmp_path):
    state, step, _, _ = setup(mesh8)
    with CheckpointManager(tmp_path / "ckpt") as cm:
        with pytest.raises(NonFiniteLossError, match=r"step 5; the batch of step 5 holds NaN.*last good checkpoint is step 4") as err:
            train_loop(None, state, step, ToyData(nan_at=4), cm, None, num_steps=10, save_every=2, log_every=100)
        assert err.value.step == 5 and err.value.last_checkpoint_step == 4 and err.value.discarded_step is None
        assert cm.all_steps() == [2, 4]  # the data is to blame, not checkpoint 4
        state2, _, _, _ = setup(mesh8)
        r = cm.restore(None, state2)
        assert r.step == 4 and r.data_iterator_state == {"i": 4}
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(r.state.params)))


def test_divergence_names_a_checkpoint_that_resumes(mesh8, tmp_path):
    ckpt = tmp_path / "ckpt"
    state, step, _, _ = setup(mesh8)
    with CheckpointManager(ckpt) as cm:
        train_loop(None, state, step, ToyData(), cm, None, num_steps=2, save_every=1, log_every=100)
    # lr 1e30: step 3's update leaves finite weights of ~1e30 (saved as checkpoint 3) that overflow at step 4.
    state, step, _, _ = setup(mesh8, opt_cfg(lr=1e30))
    with CheckpointManager(ckpt) as cm:
        with pytest.raises(NonFiniteLossError, match=r"at step 4; deleted checkpoint step 3.*last good checkpoint is step 2") as err:
            train_loop(None, state, step, ToyData(), cm, None, num_steps=10, save_every=1, log_every=100)
        assert (err.value.discarded_step, err.value.last_checkpoint_step) == (3, 2)
        assert cm.all_steps() == [1, 2]
    losses = []
    state, step, _, _ = setup(mesh8)
    with CheckpointManager(ckpt) as cm:
        res = train_loop(None, state, step, ToyData(), cm, None, num_steps=6, save_every=2, log_every=100,
                         on_step=lambda s, m: losses.append(m["loss"]))
    assert res.resumed_from == 2 and res.status == STATUS_COMPLETED and res.step == 6
    assert len(losses) == 4 and all(np.isfinite(losses)), losses


def test_non_finite_state_is_never_saved(mesh8, tmp_path):
    state, step, _, _ = setup(mesh8)

    def overflowing_step(state, batch):  # finite loss and gradient, the update overflows one weight
        state, metrics = step(state, batch)
        params = jax.tree.map(lambda x: x, state.params)
        params["head"]["kernel"] = params["head"]["kernel"].at[0, 0].set(jnp.inf)
        return state.replace(params=params), metrics

    with CheckpointManager(tmp_path / "ckpt") as cm:
        with pytest.raises(NonFiniteLossError, match=r"non-finite parameters or optimizer state .* at step 2; "
                                                     r".*last good checkpoint is step 1") as err:
            train_loop(None, state, lambda s, b: (step if s.step < 1 else overflowing_step)(s, b), ToyData(), cm,
                       None, num_steps=10, save_every=1, log_every=100)
        assert cm.all_steps() == [1] and err.value.step == 2


def test_fallbacks_warn_what_is_lost(mesh8, caplog, monkeypatch):
    from jax.experimental import multihost_utils

    from anim_jax.train import loop

    caplog.set_level(logging.WARNING, logger="anim_jax.train.loop")
    # Several processes without JAX's preemption service: no handler (it could not agree on a step).
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with loop._StopFlag(multiprocess=True).installed():
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert caplog.text.count("end the run without a checkpoint") == 1
    caplog.clear()

    def broken(step):
        raise RuntimeError("sync manager gone")

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", broken)
    agreement = loop._PreemptionAgreement(True)
    assert not agreement.reached(1) and not agreement.reached(2)
    assert caplog.text.count("preemption sync point failed (sync manager gone)") == 1
    caplog.clear()

    state, step, _, _ = setup(mesh8)  # a FLOP count but no known peak for a CPU: no MFU, one warning
    train_loop({"flops_per_step": 1e6}, state, step, ToyData(), None, None, num_steps=1)
    assert "MFU will not be reported" in caplog.text


def test_loop_writes_tensorboard_metrics(mesh8, tmp_path):
    state, step, _, _ = setup(mesh8)
    cfg = {"global_batch_size": 8, "flops_per_step": 1e6, "peak_flops_per_device": 1e9}
    with metrics.MetricWriter(tmp_path / "tb") as w:
        train_loop(cfg, state, step, ToyData(), None, w, num_steps=4, log_every=2)
    scalars = {(r["step"], tag): v for r in metrics.read_metrics(tmp_path / "tb") for tag, v in r.items()}
    for tag in ("loss", "grad_norm", "lr", "pred_abs", "step_time", "examples_per_sec", "mfu"):
        assert (4, tag) in scalars, tag
    assert (2, "loss") in scalars and (2, "step_time") in scalars
    assert scalars[(4, "mfu")] == pytest.approx(1e6 / (scalars[(4, "step_time")] * 1e9 * 8), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# TensorBoard event files
# ---------------------------------------------------------------------------------------------


def read_events(path):
    """The events of one file, read by TensorBoard's own loader (which checks every record's CRCs)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    events = []
    for event in LegacyEventFileLoader(str(path)).Load():
        ev = {"wall_time": event.wall_time, "step": event.step, "scalars": {}, "images": {}}
        if event.file_version:
            ev["file_version"] = event.file_version
        for value in event.summary.value:
            if value.HasField("simple_value"):
                ev["scalars"][value.tag] = value.simple_value
            if value.HasField("image"):
                im = value.image
                ev["images"][value.tag] = (im.height, im.width, im.colorspace, im.encoded_image_string)
        events.append(ev)
    return events


def test_tensorboard_event_file_parses_back(tmp_path):
    import io

    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    frames = np.random.default_rng(1).random((4, 6, 8, 3)).astype(np.float32)
    with metrics.MetricWriter(tmp_path) as w:
        w.write_scalars(1, {"loss": 0.5, "lr": 1e-5, "nan_is_skipped": float("nan")})
        w.write_scalars(2, {"loss": np.float32(0.25), "loss_t/000-249": 0.75})
        w.write_images(2, {"samples/ref": img})
        gif_path = w.write_video(2, "val/video", frames, fps=4)
        path = w.path
    assert os.path.basename(path).startswith("events.out.tfevents.") and os.path.dirname(path) == str(tmp_path)
    events = read_events(path)
    assert events[0]["file_version"] == "brain.Event:2"
    scalars = {(e["step"], t): v for e in events for t, v in e["scalars"].items()}
    assert scalars == {(1, "loss"): 0.5, (1, "lr"): pytest.approx(1e-5), (2, "loss"): 0.25, (2, "loss_t/000-249"): 0.75}
    images = {t: im for e in events for t, im in e["images"].items() if e["step"] == 2}
    h, wd, c, png = images["samples/ref"]
    assert (h, wd, c) == (5, 7, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), img)
    h, wd, c, gif = images["val/video"]
    assert (h, wd, c) == (6, 8, 3) and gif[:6] in (b"GIF87a", b"GIF89a")
    g = Image.open(io.BytesIO(gif))
    assert g.n_frames == 4 and open(gif_path, "rb").read() == gif
    # metrics.jsonl: one JSON object per write_scalars call, non-finite values left out
    records = [json.loads(line) for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in records] == [
        {"step": 1, "loss": 0.5, "lr": 1e-5}, {"step": 2, "loss": 0.25, "loss_t/000-249": 0.75}]
    assert metrics.read_metrics(tmp_path) == records and metrics.scalar_series(tmp_path, "loss") == [(1, 0.5), (2, 0.25)]


def test_mfu_and_timestep_buckets():
    assert metrics.mfu(4e15, 2.0, 1e15, 4) == pytest.approx(0.5)
    out = metrics.timestep_bucket_losses(jnp.array([1.0, 3.0, 5.0]), jnp.array([10, 20, 999]), 4, 1000)
    assert list(out) == ["loss_t/000-249", "loss_t/250-499", "loss_t/500-749", "loss_t/750-999"]
    assert float(out["loss_t/000-249"]) == 2.0 and float(out["loss_t/750-999"]) == 5.0
    assert np.isnan(float(out["loss_t/250-499"]))


# ---------------------------------------------------------------------------------------------
# Distributed start-up
# ---------------------------------------------------------------------------------------------


def test_distributed_plan_from_environment():
    assert distributed.distributed_plan({}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert distributed.distributed_plan(env) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2, cluster_detection_method="deactivate"
    )
    assert distributed.distributed_plan(dict(env, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")) is None
    assert distributed.distributed_plan(dict(env, ANIM_JAX_DISTRIBUTED="0")) is None
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.distributed_plan({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "32",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}
    assert distributed.distributed_plan(slurm) == dict(cluster_detection_method="slurm")
    assert distributed.distributed_plan(dict(slurm, SLURM_NTASKS="1")) is None
    assert distributed.maybe_initialize_distributed() is False  # this test process is alone
