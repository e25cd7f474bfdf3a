"""Animate Anyone training on tiny models (configs/tiny.py), CPU, 1 or 2 of the 8 fake devices.

* the per-sample unconditional switch is exactly plain self-attention for the switched-off samples;
* stage 1 lowers the loss on a fixed batch and trains exactly its modules;
* ``anim-jax train`` end to end: checkpoints, event files, validation video, export; resume is exact;
* initialisation sources: a stage-1 checkpoint / export, AnimateDiff-format motion modules.

The jitted train steps are cached by configuration (``animate_anyone._STEP_CACHE``), so the stage-1
tests and the command-line runs share one compilation. Stage 2's training and remat are in
test_train_animate_anyone_stage2.py (a file of its own, so the two test workers share the load).
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anim_jax import cli as main_cli
from anim_jax import configlib
from anim_jax.models.animate_anyone import COMPONENTS
from anim_jax.train import optim, schedules
from anim_jax.train import weights as train_weights
from anim_jax.train.architecture import build_model, component_configs
from anim_jax.train.setup import setup
from anim_jax.train.stages import trainable_filter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_infra import read_events  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGE1 = str(ROOT / "configs" / "stage1.py") + ":tiny"
STAGE2 = str(ROOT / "configs" / "stage2.py") + ":tiny"
# Stage 1 (and the command-line runs, which share its compilation) on one device: compiling the
# 2-way SPMD program costs ~40% more on this CPU. Stage 2 runs sharded over two devices.
COMMON = ["--config.mesh.num_devices=1"]


def load(spec, *overrides):
    return configlib.load_config(spec, [*COMMON, *overrides])


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def flat(tree) -> dict[str, np.ndarray]:
    """Dotted path -> host array, for a pure dict of arrays or an NNX module."""
    if isinstance(tree, nnx.Module):
        return {k: np.asarray(jax.device_get(v)) for k, v in train_weights.flat_arrays(tree).items()}
    return {optim.path_str([getattr(k, "key", k) for k in p]): np.asarray(jax.device_get(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@jax.jit
def _copy(tree):
    # x + 0 (not an identity, which jit would forward as the same buffer): fresh buffers, one compile.
    return jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), tree)


def copy_state(state):
    """A copy that survives the step's donation of its input."""
    return _copy(state)


def loss_at_step0_key(trainer, state, batch) -> float:
    """The loss of ``state``'s parameters with the noise, timesteps and uncond draws of step 0
    (the step's key is fold_in(rng, step)), through the train step itself (no extra compile)."""
    state = copy_state(state)
    _, m = trainer.train_step(state.replace(step=state.step * 0), batch)
    return float(m["loss"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, devices):
    from data_pipelines.synthetic import write_synthetic_dataset

    path = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_dataset(path, 2, num_frames=12, height=64, width=64)
    return str(path)


def first_batch(cfg, dataset, batch_size):
    from anim_jax.train.data import data_config
    from data_pipelines.grain_pipeline import make_map_dataset

    with cfg.unlocked():
        cfg.data.dataset = dataset
    ds = make_map_dataset(data_config(cfg, batch_size), process_index=0, process_count=1)
    batch = ds[0]
    batch.pop("index")
    return batch


# ---------------------------------------------------------------------------------------------
# The unconditional switch
# ---------------------------------------------------------------------------------------------


def test_uncond_samples_get_plain_self_attention_exactly(devices):
    cfg = load(STAGE1)
    model = build_model(cfg)
    r = np.random.default_rng(0)
    b, lat = 3, (8, 8, 4)
    noisy = jnp.asarray(r.standard_normal((b, 1) + lat), jnp.float32)
    pose = jnp.asarray(r.standard_normal((b, 1, 8, 8, 32)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((b, 1, 32)), jnp.float32)
    t = jnp.asarray([10, 500, 990])
    # ReferenceNet-shaped tokens (what AnimateAnyone.reference projects), random values.
    shapes = jax.eval_shape(lambda x, c: model.reference_net(x, jnp.zeros((b,), jnp.int32), c),
                            jax.ShapeDtypeStruct((b,) + lat, jnp.float32), ctx)
    tokens = {p: jnp.asarray(r.standard_normal(x.shape), jnp.float32) for p, x in shapes.items()}
    uncond = jnp.asarray([False, True, False])

    @jax.jit
    def run(tokens):
        kv = model.denoiser.reference_kv(tokens)
        masked = model.predict(noisy, t, ctx, reference={p: k._replace(enabled=~uncond) for p, k in kv.items()},
                               pose_features=pose)
        plain = model.predict(noisy, t, ctx, reference=None, pose_features=pose)
        unmasked = model.predict(noisy, t, ctx, reference=kv, pose_features=pose)
        return masked, plain, unmasked

    masked, plain, unmasked = map(np.asarray, run(tokens))
    # The masked keys get probability exactly 0, so what remains is float32 rounding: XLA reduces
    # over 2L keys instead of L (a different summation order), ~1e-7 relative.
    scale = np.abs(plain).max()
    # The unconditional sample is the denoiser without reference attention...
    assert np.abs(masked[1] - plain[1]).max() <= 2e-6 * scale
    # ... and the conditional ones the denoiser with it.
    assert np.abs(masked[[0, 2]] - unmasked[[0, 2]]).max() <= 2e-6 * scale
    # The reference matters by orders of magnitude more, so the checks above are not vacuous.
    assert np.abs(unmasked[1] - plain[1]).max() > 1e-2 * scale


def test_uncond_clip_input_is_the_encoded_zero_image(devices):
    """Moore's training uncond CLIP input: zeros_like of the normalised pixels, through the encoder."""
    model = build_model(load(STAGE1))
    clip = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    ctx = np.asarray(jax.jit(model.image_context)(clip, jnp.asarray([False, True])))
    zero = np.asarray(jax.jit(model.image_encoder)(jnp.zeros((1, 32, 32, 3))))[0]
    np.testing.assert_allclose(ctx[1, 0], zero, rtol=1e-6, atol=1e-6)
    assert np.abs(ctx[0, 0] - zero).max() > 1e-3


def test_image_context_passes_gradients_to_the_encoder(devices):
    """A recipe may train the image encoder (the demo's: no pretrained CLIP there), so the context
    must not cut its gradient; a frozen one gets none because training differentiates only the
    trainable parameters. Under a stop_gradient every gradient here is exactly zero."""
    model = build_model(load(STAGE1))
    clip = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    grads = nnx.grad(lambda m: jnp.sum(m.image_context(clip) ** 2))(model)
    leaves = jax.tree.leaves(grads["image_encoder"])
    assert max(float(jnp.abs(g).max()) for g in leaves) > 1e-4


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------


def test_stage1_trainable_set(devices):
    cfg = load(STAGE1)
    model = build_model(cfg)
    mask = trainable_filter(model, cfg.trainable.include, cfg.trainable.exclude)
    paths = [optim.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    trained = {p for p in paths if mask.selects(p)}
    last = f"reference_net.up_blocks.{len(model.reference_net.up_blocks) - 1}."
    expected = {p for p in paths if p.split(".")[0] in ("denoiser", "reference_net", "pose_guider")
                and not p.startswith(last)}
    assert trained == expected and any(p.startswith(last) for p in paths)
    # Stage 2's trainable set names motion modules, which a stage-1 (2-D) denoiser does not have.
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_filter(model, load(STAGE2).trainable.include)
    # The VAE's latents carry no gradient, so it is refused rather than left to drift by weight decay.
    with pytest.raises(ValueError, match=r"vae\..*cannot train"):
        trainable_filter(model, (r"^denoiser\.", r"^vae\."))


def test_stage1_lowers_the_loss_on_a_fixed_batch(dataset):
    cfg = load(STAGE1)
    trainer = setup(cfg)
    batch = trainer.put_batch(first_batch(cfg, dataset, trainer.global_batch_size))
    state = trainer.state
    before = loss_at_step0_key(trainer, state, batch)
    frozen_before = host(state.frozen)
    for _ in range(8):
        state, m = trainer.train_step(state, batch)
        assert np.isfinite(float(m["loss"]))
    after = loss_at_step0_key(trainer, state, batch)
    assert after < 0.7 * before, (before, after)
    jax.tree.map(np.testing.assert_array_equal, host(state.frozen), frozen_before)
    for k in ("mse", "snr_weight", "uncond_fraction", "loss_t/000-249", "loss_t/750-999", "grad_norm", "lr"):
        assert k in m


# ---------------------------------------------------------------------------------------------
# anim-jax train
# ---------------------------------------------------------------------------------------------


def cli_run(workdir, dataset, *overrides) -> int:
    return main_cli.main(["train", "--config", STAGE1, "--workdir", str(workdir), *COMMON,
                          f"--config.data.dataset={dataset}", "--config.train.log_every=2",
                          "--config.train.peak_flops_per_device=1e12", *overrides])


@pytest.fixture(scope="module")
def stage1_run(dataset, tmp_path_factory):
    """``anim-jax train`` for 2 steps with validation, then resumed to 4."""
    workdir = tmp_path_factory.mktemp("stage1") / "run"
    assert cli_run(workdir, dataset, "--config.train.num_steps=2", "--config.train.save_every=2",
                   "--config.validation.every=2") == 0
    first = sorted(os.listdir(workdir / "checkpoints"))
    assert cli_run(workdir, dataset, "--config.train.num_steps=4", "--config.train.save_every=2") == 0
    return workdir, first


def test_cli_trains_checkpoints_logs_validates_and_exports(stage1_run):
    workdir, first = stage1_run
    assert first == ["2"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert (workdir / "config.json").is_file()
    events = [e for f in sorted((workdir / "logs").glob("events.out.tfevents.*")) for e in read_events(f)]
    tags = {t for e in events for t in e["scalars"]}
    for tag in ("loss", "mse", "grad_norm", "lr", "step_time", "examples_per_sec", "mfu", "loss_t/000-249"):
        assert tag in tags, tag
    steps = {e["step"] for e in events if "loss" in e["scalars"]}
    assert steps == {2, 4}
    assert any("validation" in e["images"] for e in events)
    assert (workdir / "validation" / "step_00000002.mp4").stat().st_size > 0
    assert (workdir / "logs" / "videos" / "validation_00000002.gif").is_file()
    for name in COMPONENTS:
        assert (workdir / "export" / f"{name}.safetensors").is_file()
    # Moore's inference schedule by default (config.diffusion.export_beta_schedule).
    from anim_jax.convert import store
    from anim_jax.diffusion import NoiseSchedule, moore_inference_schedule

    assert NoiseSchedule.from_config(store.read_config(workdir / "export")["schedule"]) == moore_inference_schedule()
    # The export records what it was trained at (tiny stage 1: 64x64, one frame) and validated with.
    from anim_jax import native

    assert native.from_config(store.read_config(workdir / "export")) == native.NativeSettings(
        width=64, height=64, steps=3, guidance_scale=3.5, context_frames=24)


def test_diffusion_config_sets_the_training_and_export_schedules(devices):
    from anim_jax.diffusion import moore_inference_schedule, moore_training_schedule

    cfg = load(STAGE1)
    assert schedules.training_schedule(cfg) == moore_training_schedule()
    assert schedules.export_schedule(cfg) == moore_inference_schedule()
    cfg = load(STAGE1, "--config.diffusion.prediction_type=sample", "--config.diffusion.export_beta_schedule=scaled_linear")
    assert schedules.training_schedule(cfg) == moore_training_schedule(prediction_type="sample")
    assert schedules.export_schedule(cfg) == moore_inference_schedule(beta_schedule="scaled_linear", prediction_type="sample")
    assert schedules.validation_schedule("linear", cfg).prediction_type == "sample"


def test_random_reference_net_starts_as_a_copy_of_the_denoiser(devices):
    """Moore initialises both UNets from one SD checkpoint; a run without weights does the same with
    the denoiser's random draw (config.init.reference_net_from_denoiser), unless switched off."""
    model = train_weights.init_model(load(STAGE1))
    ref, den = flat(model.reference_net), flat(model.denoiser)
    assert len(ref) > 10 and all(np.array_equal(v, den[k]) for k, v in ref.items())
    model = train_weights.init_model(load(STAGE1, "--config.init.reference_net_from_denoiser=False"))
    ref, den = flat(model.reference_net), flat(model.denoiser)
    assert not np.array_equal(ref["conv_in.kernel"], den["conv_in.kernel"])


def test_cli_resume_is_exact(stage1_run, dataset, tmp_path):
    """2 steps + resume to 4 (the fixture) == 4 steps straight, bitwise."""
    workdir, _ = stage1_run
    assert cli_run(tmp_path / "straight", dataset, "--config.train.num_steps=4", "--config.train.save_every=4",
                   "--config.train.export=False") == 0
    resumed = train_weights.read_train_checkpoint(workdir / "checkpoints", 4, items=("params", "opt_state", "rng", "step"))
    straight = train_weights.read_train_checkpoint(tmp_path / "straight" / "checkpoints", 4,
                                        items=("params", "opt_state", "rng", "step"))
    assert resumed.keys() == straight.keys() and len(resumed) > 100
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


def test_stage2_initialises_from_stage1_results(stage1_run, tmp_path):
    workdir, _ = stage1_run
    ckpt = train_weights.read_train_checkpoint(workdir / "checkpoints")
    # From the Orbax checkpoint (its config has random init otherwise).
    cfg = load(STAGE2, f"--config.init.stage1_checkpoint={workdir / 'checkpoints'}")
    model = train_weights.init_model(cfg)
    got = flat(model)
    shared = [p for p in ckpt if p in got]
    assert len(shared) == len(ckpt)  # the stage-1 model is the stage-2 model minus the motion modules
    for p in shared:
        np.testing.assert_array_equal(got[p], ckpt[p], err_msg=p)
    motion = [p for p in got if ".motion_modules." in p]
    assert motion and all(p not in ckpt for p in motion)
    assert all(not got[p].any() for p in motion if ".proj_out." in p)  # fresh modules are the identity
    # From the export directory, plus AnimateDiff-format motion modules.
    from anim_jax.convert.mapping import export_torch_state_dict
    from anim_jax.convert.motion_keys import MOTION_KEYMAP_ORIGINAL
    from anim_jax.convert.readers import write_safetensors
    from anim_jax.models.motion import MotionModule

    donor = build_model(load(STAGE2), seed=99).denoiser
    sd = {}
    for p, node in nnx.iter_graph(donor):
        if isinstance(node, MotionModule):
            for k, v in export_torch_state_dict(node, MOTION_KEYMAP_ORIGINAL).items():
                sd[f"{optim.path_str(p)}.{k}"] = v
    mm = tmp_path / "mm_sd_v15_v2.safetensors"
    write_safetensors(mm, sd)
    cfg = load(STAGE2, f"--config.init.weights_dir={workdir / 'export'}", f"--config.init.motion_modules={mm}")
    model = train_weights.init_model(cfg)
    got = flat(model)
    donor_params = {f"denoiser.{k}": v for k, v in flat(donor).items()}
    for p in got:
        want = donor_params[p] if ".motion_modules." in p else ckpt.get(p)
        if want is not None:
            np.testing.assert_array_equal(got[p], want, err_msg=p)


def test_stage1_init_from_sd_unet_and_controlnet(stage1_run, tmp_path):
    """A weights directory without a ReferenceNet file takes it from the denoiser (Moore initialises
    both from one SD UNet); init.controlnet fills the PoseGuider with a zero conv_out."""
    import shutil

    from anim_jax.convert.mapping import export_torch_state_dict
    from anim_jax.convert.pose_guider_keys import POSE_GUIDER_KEYMAP
    from anim_jax.convert.readers import write_safetensors

    workdir, _ = stage1_run
    weights = tmp_path / "sd_init"
    shutil.copytree(workdir / "export", weights)
    (weights / "reference_net.safetensors").unlink()
    (weights / "pose_guider.safetensors").unlink()
    donor = build_model(load(STAGE1), seed=7).pose_guider
    donor.conv_out.kernel[...] = jnp.ones_like(donor.conv_out.kernel[...])
    controlnet = tmp_path / "control_openpose.safetensors"
    write_safetensors(controlnet, {f"controlnet_cond_embedding.{k}": v
                                   for k, v in export_torch_state_dict(donor, POSE_GUIDER_KEYMAP).items()}
                      | {"controlnet_mid_block.weight": np.zeros((4, 4, 1, 1), np.float32)})
    model = train_weights.init_model(load(STAGE1, f"--config.init.weights_dir={weights}", f"--config.init.controlnet={controlnet}"))
    exported = {k: v for k, v in train_weights.read_weights_file(workdir / "export" / "denoiser.safetensors").items()}
    ref = flat(model.reference_net)
    assert ref and all(np.array_equal(v, exported[k]) for k, v in ref.items())
    pose, want = flat(model.pose_guider), flat(donor)
    for k, v in pose.items():
        np.testing.assert_array_equal(v, np.zeros_like(v) if k.startswith("conv_out.") else want[k], err_msg=k)


def test_xla_options_reach_the_train_step_compile(devices):
    from anim_jax.train.setup import xla_options

    assert xla_options(" xla_a=1, xla_b = x ,") == {"xla_a": "1", "xla_b": "x"} and xla_options("") == {}
    with pytest.raises(ValueError, match="config.train.xla_options"):
        xla_options("xla_backend_optimization_level")
    # XLA itself rejects an option it does not know: the string reached the step's compilation
    trainer = setup(load(STAGE1, "--config.train.xla_options=xla_anim_jax_no_such_option=1"))
    with pytest.raises(Exception, match="xla_anim_jax_no_such_option"):
        trainer.lower().compile()


def test_bad_config_is_reported_by_field(devices):
    with pytest.raises(ValueError, match="clip_size"):
        component_configs(load(STAGE1, "--config.data.clip_size=48"))
    with pytest.raises(ValueError, match="resolution"):
        component_configs(load(STAGE1, "--config.data.resolution=(60, 64)"))
    with pytest.raises(ValueError, match="dataset"):
        from anim_jax.train.data import data_config

        data_config(load(STAGE1), 8)
