"""anim_jax.diffusion against diffusers' DDIMScheduler (CPU, float32) and Moore's documented numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.training_utils import compute_snr

from anim_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    ddim_step,
    diffusion_loss,
    min_snr_weight,
    moore_inference_schedule,
    moore_training_schedule,
    offset_noise,
    predict_eps,
    predict_x0,
    snr,
    training_target,
    velocity,
)

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, clip_sample=False)
ZERO_SNR_V = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")
MOORE = dict(SD, timestep_spacing="trailing", steps_offset=1, **ZERO_SNR_V)
CONFIGS = {
    # Moore inference (configs/inference/inference_v2.yaml) and training (scaled_linear override).
    "moore_inference": dict(MOORE, beta_schedule="linear"),
    "moore_training": dict(MOORE, beta_schedule="scaled_linear"),
    # Stable Diffusion 1.5's own scheduler: epsilon, leading, steps_offset 1.
    "sd15_leading_eps": dict(SD, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
    "linspace_eps_no_alpha_one": dict(
        SD, beta_schedule="linear", timestep_spacing="linspace", set_alpha_to_one=False
    ),
    "leading_v_zero_snr_no_alpha_one": dict(
        SD, beta_schedule="scaled_linear", timestep_spacing="leading", set_alpha_to_one=False, **ZERO_SNR_V
    ),
    # x0-prediction (configs/demo.py trains the CPU demo this way).
    "trailing_sample_zero_snr": dict(
        SD, beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True,
        prediction_type="sample",
    ),
    "trailing_eps_clip": dict(
        SD, beta_schedule="linear", timestep_spacing="trailing", steps_offset=1, clip_sample=True,
        clip_sample_range=0.7,
    ),
}
STEP_COUNTS = (20, 25, 30, 50, 1)


def _pair(name):
    cfg = CONFIGS[name]
    return NoiseSchedule.from_config(cfg), DDIMScheduler(**cfg)


def _t(x):
    return torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize("name", CONFIGS)
def test_alphas_cumprod_match_diffusers(name):
    ours, ref = _pair(name)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    assert ours.alphas_cumprod.dtype == np.float32
    assert ours.final_alpha_cumprod == np.float32(ref.final_alpha_cumprod)
    if ours.rescale_betas_zero_snr:
        assert ours.alphas_cumprod[-1] == 0.0


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", STEP_COUNTS + (999, 1000))
def test_inference_timesteps_match_diffusers(name, steps):
    ours, ref = _pair(name)
    ref.set_timesteps(steps)
    ts = ours.inference_timesteps(steps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    assert np.issubdtype(ts.dtype, np.integer)


def test_too_many_steps_is_an_error_like_diffusers():
    ours, ref = _pair("moore_inference")
    with pytest.raises(ValueError):
        ref.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ours.inference_timesteps(1001)
    with pytest.raises(ValueError, match="positive"):
        ours.inference_timesteps(0)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("table", ["ours", "diffusers"])
def test_ddim_step_matches_diffusers(name, steps, eta, table):
    """prev_sample vs ``DDIMScheduler.step`` on unit-scale float32 inputs.

    ``table="ours"`` gives diffusers our ᾱ table, so only the update arithmetic is compared: within
    1e-6. ``table="diffusers"`` compares end to end: torch's float32 ``sqrt``/``linspace`` on AVX512
    CPUs are not correctly rounded, so its ᾱ differs from ours by up to ~4e-7 (see
    test_alphas_cumprod_match_diffusers) and the update amplifies that up to ~5x near t = 0, hence
    3e-6. Epsilon prediction divides by sqrt(ᾱ_t), which amplifies float32 rounding by 1/sqrt(ᾱ_t);
    the tolerance scales with it.
    """
    ours, ref = _pair(name)
    if table == "ours":
        ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
        ref.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod)
    ref.set_timesteps(steps)
    rng = np.random.default_rng(steps)
    shape = (2, 3, 5, 4)
    for t in ours.inference_timesteps(steps):
        sample, model_output, noise = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        expected = ref.step(
            _t(model_output), int(t), _t(sample), eta=eta, variance_noise=_t(noise) if eta else None
        ).prev_sample.numpy()
        got = ddim_step(ours, model_output, int(t), sample, steps, eta=eta, noise=noise if eta else None)
        assert got.dtype == jnp.float32
        tol = 1e-6 if table == "ours" else 3e-6
        if ours.prediction_type == "epsilon":
            tol /= float(ours.alphas_cumprod[t]) ** 0.5
        if ours.prediction_type == "sample":  # ε̂ divides by sqrt(1 - ᾱ_t) instead
            tol /= float(1 - ours.alphas_cumprod[t]) ** 0.5
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=tol, err_msg=f"t={t}")


def test_ddim_step_jit_traced_timestep_equals_eager():
    sched = moore_inference_schedule()
    steps = 30
    rng = np.random.default_rng(0)
    sample, model_output, noise = (rng.standard_normal((2, 4, 6, 3), dtype=np.float32) for _ in range(3))
    jitted = jax.jit(lambda mo, t, x, n: ddim_step(sched, mo, t, x, steps, eta=0.3, noise=n))
    for t in sched.inference_timesteps(steps):
        eager = ddim_step(sched, model_output, int(t), sample, steps, eta=0.3, noise=noise)
        traced = jitted(model_output, jnp.int32(t), sample, noise)
        np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["moore_inference", "sd15_leading_eps"])
def test_jitted_scan_sampling_loop_matches_diffusers_loop(name):
    """The whole sampling loop as one jitted lax.scan over traced timesteps, with a toy 'model'."""
    ours, ref = _pair(name)
    steps = 25
    ref.set_timesteps(steps)
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal((1, 6, 5, 4), dtype=np.float32)
    bias = rng.standard_normal((1, 6, 5, 4), dtype=np.float32)

    def toy_model(x, t):
        return 0.3 * x + 0.2 * bias * (t / 1000.0)

    x = _t(x_T)
    for t in ref.timesteps:
        x = ref.step(0.3 * x + 0.2 * _t(bias) * (t.float() / 1000.0), t, x).prev_sample
    expected = x.numpy()

    @jax.jit
    def sample(x, timesteps):
        def body(x, t):
            return ddim_step(ours, toy_model(x, t), t, x, steps), None

        return jax.lax.scan(body, x, timesteps)[0]

    got = sample(jnp.asarray(x_T), jnp.asarray(ours.inference_timesteps(steps), jnp.int32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["moore_inference", "moore_training", "sd15_leading_eps"])
@pytest.mark.parametrize("table", ["ours", "diffusers"])
def test_add_noise_and_velocity_match_diffusers(name, table):
    """Within 1e-6 given the same ᾱ table. With diffusers' own table the ~4e-7 ᾱ difference is
    amplified by d sqrt(1 - ᾱ)/dᾱ = 1/(2 sqrt(1 - ᾱ)) (≈ 17 at t = 0), so the tolerance scales with it."""
    ours, ref = _pair(name)
    if table == "ours":
        ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
    rng = np.random.default_rng(2)
    x0, noise = (rng.standard_normal((6, 3, 4, 2), dtype=np.float32) for _ in range(2))
    t = np.array([0, 1, 250, 500, 998, 999], dtype=np.int64)
    tol = np.full((6, 1, 1, 1), 1e-6)
    if table == "diffusers":
        one_minus = np.maximum(1.0 - ours.alphas_cumprod[t].astype(np.float64), 1e-12)
        tol = tol + (4e-7 * 4 / (2 * np.sqrt(one_minus))).reshape(6, 1, 1, 1)
    for got, expected in [
        (add_noise(ours, x0, noise, t), ref.add_noise(_t(x0), _t(noise), _t(t))),
        (velocity(ours, x0, noise, t), ref.get_velocity(_t(x0), _t(noise), _t(t))),
    ]:
        assert np.all(np.abs(np.asarray(got) - expected.numpy()) <= tol)
    # jit with per-sample traced t
    jitted = jax.jit(lambda x, n, tt: (add_noise(ours, x, n, tt), velocity(ours, x, n, tt)))
    noisy, v = jitted(x0, noise, jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(np.asarray(noisy), np.asarray(add_noise(ours, x0, noise, t)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), np.asarray(velocity(ours, x0, noise, t)), rtol=0, atol=1e-6)


def test_predictions_invert_the_forward_process():
    sched = moore_training_schedule()
    rng = np.random.default_rng(3)
    x0, noise = (rng.standard_normal((4, 3, 3, 2), dtype=np.float32) for _ in range(2))
    t = np.array([0, 100, 600, 999])
    x_t = add_noise(sched, x0, noise, t)
    np.testing.assert_allclose(
        np.asarray(predict_x0(sched, training_target(sched, x0, noise, t), t, x_t)), x0, rtol=0, atol=1e-5
    )
    eps_sched = NoiseSchedule(prediction_type="epsilon")
    np.testing.assert_array_equal(np.asarray(training_target(eps_sched, x0, noise, t)), noise)
    x0_sched = moore_training_schedule(prediction_type="sample")
    np.testing.assert_array_equal(np.asarray(training_target(x0_sched, x0, noise, t)), x0)
    np.testing.assert_allclose(
        np.asarray(predict_eps(x0_sched, x0, t, add_noise(x0_sched, x0, noise, t))), noise, rtol=0, atol=1e-4
    )


def test_x0_min_snr_weight_is_min_snr_gamma():
    """Hang et al. 2023 (Min-SNR), eq. 8: an x0 loss is weighted by min(SNR, γ) itself."""
    sched = moore_training_schedule(prediction_type="sample")
    t = np.arange(1000)
    s = np.asarray(snr(sched, t))
    np.testing.assert_allclose(np.asarray(min_snr_weight(sched, t, gamma=5.0)), np.minimum(s, 5.0), rtol=1e-6)
    assert float(min_snr_weight(sched, 999)) == 0.0


def test_moore_documented_timesteps():
    sched = moore_inference_schedule()
    t30 = sched.inference_timesteps(30)
    assert len(t30) == 30 and list(t30[:3]) == [999, 966, 932] and list(t30[-2:]) == [66, 32]
    t25 = sched.inference_timesteps(25)
    assert len(t25) == 25 and list(t25[:3]) == [999, 959, 919] and t25[-1] == 39
    t20 = sched.inference_timesteps(20)
    assert list(t20[:2]) == [999, 949] and t20[-1] == 49
    # the last of 30 steps goes to ᾱ = 1 (prev_t = 32 - 33 < 0, set_alpha_to_one)
    assert sched.final_alpha_cumprod == 1.0
    # moore.md §2.1: ᾱ of the two schedules at a few timesteps
    train = moore_training_schedule()
    np.testing.assert_allclose(train.alphas_cumprod[[100, 250, 500, 750]], [0.887, 0.652, 0.241, 0.033], atol=6e-4)
    np.testing.assert_allclose(sched.alphas_cumprod[[100, 250, 500, 750]], [0.862, 0.554, 0.142, 0.013], atol=6e-4)
    assert train.alphas_cumprod[999] == 0.0 and sched.alphas_cumprod[999] == 0.0


def test_presets():
    inf, train = moore_inference_schedule(), moore_training_schedule()
    assert (inf.beta_schedule, train.beta_schedule) == ("linear", "scaled_linear")
    for s in (inf, train):
        assert s.rescale_betas_zero_snr and s.prediction_type == "v_prediction"
        assert s.timestep_spacing == "trailing" and s.steps_offset == 1 and not s.clip_sample
    assert moore_training_schedule(timestep_spacing="leading").timestep_spacing == "leading"
    assert hash(inf) == hash(moore_inference_schedule())  # usable as a jit static argument


@pytest.mark.parametrize(
    "field,value", [("beta_schedule", "cosine"), ("prediction_type", "flow"), ("timestep_spacing", "uniform")]
)
def test_unknown_names_are_errors(field, value):
    with pytest.raises(ValueError, match=field) as err:
        NoiseSchedule(**{field: value})
    assert "allowed values" in str(err.value)


def test_from_config():
    cfg = dict(CONFIGS["moore_inference"], _class_name="DDIMScheduler", trained_betas=None)
    assert NoiseSchedule.from_config(cfg) == moore_inference_schedule()
    with pytest.raises(ValueError, match="thresholding"):
        NoiseSchedule.from_config(dict(cfg, thresholding=True))


def test_eta_without_noise_is_an_error():
    sched = moore_inference_schedule()
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(sched, x, 999, x, 30, eta=0.5)


# ---------------------------------------------------------------------------------------------- losses


def test_min_snr_weights_documented_values():
    """moore.md §5.3, obtained by running Moore's training code (scaled_linear zero-SNR, γ = 5)."""
    sched = moore_training_schedule()
    w = np.asarray(min_snr_weight(sched, np.arange(1000), gamma=5.0))
    assert round(float(w[0]), 4) == 0.0043
    assert round(float(w[50]), 2) == 0.26
    assert round(float(w[100]), 2) == 0.57
    assert round(float(w[150]), 2) == 0.92
    assert np.all(w[161:] == 1.0) and np.all(w[:161] < 1.0)


@pytest.mark.parametrize(
    "prediction_type,zero_snr", [("v_prediction", True), ("v_prediction", False), ("epsilon", False)]
)
def test_snr_and_loss_match_moore_torch_code(prediction_type, zero_snr):
    cfg = dict(CONFIGS["moore_training"], prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    ours, ref = NoiseSchedule.from_config(cfg), DDIMScheduler(**cfg)
    rng = np.random.default_rng(4)
    t = np.array([0, 10, 50, 100, 161, 400, 700, 999])
    pred, target = (rng.standard_normal((8, 2, 3, 4, 2), dtype=np.float32) for _ in range(2))

    ref_snr = compute_snr(ref, _t(t))
    np.testing.assert_allclose(np.asarray(snr(ours, t)), ref_snr.numpy(), rtol=1e-5)
    # Moore train_stage_1.py, min-SNR branch
    s = ref_snr + 1 if prediction_type == "v_prediction" else ref_snr
    w = torch.stack([s, 5.0 * torch.ones_like(_t(t))], dim=1).min(dim=1)[0] / s
    loss = torch.nn.functional.mse_loss(_t(pred), _t(target), reduction="none")
    expected = (loss.mean(dim=list(range(1, loss.ndim))) * w).mean().item()
    np.testing.assert_allclose(float(diffusion_loss(pred, target, t, ours, snr_gamma=5.0)), expected, rtol=1e-6)
    plain = torch.nn.functional.mse_loss(_t(pred), _t(target)).item()
    np.testing.assert_allclose(float(diffusion_loss(pred, target, t, ours)), plain, rtol=1e-6)


def test_epsilon_weight_at_zero_snr_is_its_limit():
    sched = NoiseSchedule(rescale_betas_zero_snr=True, prediction_type="epsilon")
    assert float(snr(sched, 999)) == 0.0
    assert float(min_snr_weight(sched, 999)) == 1.0
    assert float(min_snr_weight(moore_training_schedule(), 999)) == 1.0


def test_diffusion_loss_jits():
    sched = moore_training_schedule()
    pred = jnp.ones((2, 3, 4)) * jnp.array([1.0, 2.0])[:, None, None]
    target = jnp.zeros((2, 3, 4), jnp.bfloat16)
    t = jnp.array([0, 500])
    loss = jax.jit(lambda p, y, t: diffusion_loss(p, y, t, sched, 5.0))(pred, target, t)
    w = min_snr_weight(sched, t)
    np.testing.assert_allclose(float(loss), float((w[0] * 1 + w[1] * 4) / 2), rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(pred, target, jnp.array([0]), sched, 5.0)


def test_offset_noise_shape_and_broadcast():
    # One shape throughout: every new shape costs seconds of XLA compilation on a small CPU.
    key = jax.random.key(0)
    shape = (4, 8, 16, 16, 4)  # (B, F, H, W, C)
    n = offset_noise(key, shape)
    assert n.shape == shape and n.dtype == jnp.float32
    base = offset_noise(key, shape, strength=0.0)
    diff = np.asarray(offset_noise(key, shape, strength=10.0) - base)
    # the offset is one value per (batch, channel), the same over frames and pixels ...
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :1, :], shape), atol=1e-5)
    per_bc = diff[:, 0, 0, 0, :]
    # ... and differs between batch elements and between channels
    assert np.abs(per_bc[:, 0] - per_bc[:, 1]).min() > 0 and np.abs(per_bc[0] - per_bc[1]).min() > 0
    np.testing.assert_allclose(np.asarray(n - base), diff / 200.0, atol=1e-5)  # strength scales linearly
    # the base noise is a standard normal
    other = np.asarray(offset_noise(jax.random.key(1), shape, strength=0.0))
    assert abs(other.mean()) < 0.03 and abs(other.std() - 1) < 0.03
    assert jax.eval_shape(lambda k: offset_noise(k, shape, dtype=jnp.bfloat16), key).dtype == jnp.bfloat16
    with pytest.raises(ValueError):
        offset_noise(key, (4,))
