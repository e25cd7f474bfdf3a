"""AnimatePipeline end to end on tiny random models: the batched, jitted, sharded sampler equals a
plain per-window loop written the way Moore-AnimateAnyone's pipeline runs it, and the CLI writes
the videos it promises."""


import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from anim_jax import cli, media, parallel
from anim_jax.diffusion import ddim_step
from anim_jax.diffusion.windows import context_windows
from anim_jax.convert.components import save_components
from anim_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection, clip_preprocess
from anim_jax.models.pose_guider import PoseGuider
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig
from anim_jax.models.vae import AutoencoderKL, VAEConfig
from anim_jax.pipeline import AnimatePipeline
from tolerance import Tol, assert_close

WIDTH, HEIGHT = 24, 32  # latent 12 x 16 with the 2x tiny VAE


def _randomise(module, seed):
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        var.value = jnp.asarray(rng.normal(0, 0.2, var.shape), var.dtype)


def tiny_components(dtype=jnp.float32) -> dict:
    """The five tiny networks, every parameter random (float32), computing in ``dtype``."""
    unet = UNetConfig(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, num_attention_heads=2,
        cross_attention_dim=16, norm_num_groups=8,
    )
    rngs = nnx.Rngs(0)
    parts = dict(
        denoiser=UNet2DConditionModel(unet, dtype=dtype, rngs=rngs),
        reference_net=UNet2DConditionModel(unet, reference_net=True, dtype=dtype, rngs=rngs),
        pose_guider=PoseGuider(16, (4, 8), dtype=dtype, rngs=rngs),  # 2x down, like the tiny VAE
        vae=AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4), dtype=dtype,
                          rngs=rngs),
        image_encoder=CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                             image_size=16, patch_size=4, projection_dim=16), dtype=dtype, rngs=rngs),
    )
    for i, m in enumerate(parts.values()):
        _randomise(m, i)  # zero-initialised layers (pose guider conv_out) must matter too
    return parts


@pytest.fixture(scope="module")
def components():
    return tiny_components()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (10, 36, 28, 3), dtype=np.uint8)
    return ref, poses


def _moore_style_loop(p: AnimatePipeline, ref, poses, *, steps, guidance, latents, window, overlap):
    """Moore's Pose2VideoPipeline loop: one window at a time, [uncond; cond] predictions summed into
    noise_pred and counter, averaged, guided, stepped."""
    ref_img = media.to_rgb_image(ref)
    ref_px = media.resize_lanczos(ref_img, WIDTH, HEIGHT)
    pose_px = np.stack([media.resize_lanczos(media.to_rgb_image(f), WIDTH, HEIGHT) for f in poses])

    @jax.jit  # one compilation instead of one per eager op (hundreds: most of this test's time)
    def conditions(ref_px, clip_px, pose_px):
        mean, _ = p.vae.encode(ref_px[None] / 127.5 - 1)
        ref_latent = mean * p.vae.config.scaling_factor
        cond = p.image_encoder(clip_px)[:, None]
        kv = p.denoiser.reference_kv(p.reference_net(ref_latent, jnp.zeros((1,), jnp.int32), cond))
        return cond, kv, p.pose_guider(pose_px / 255)

    cond, kv, pose_feat = conditions(jnp.asarray(ref_px, jnp.float32), jnp.asarray(clip_preprocess(ref_img, 16)),
                                     jnp.asarray(pose_px, jnp.float32))
    den = jax.jit(lambda x, t, c, r, pf: p.denoiser(x, t, c, num_frames=x.shape[0], reference=r, pose_features=pf))
    x = np.asarray(latents)
    pose_feat = np.asarray(pose_feat)
    for t in p.schedule.inference_timesteps(steps):
        pred = {"c": np.zeros_like(x), "u": np.zeros_like(x)}
        counter = np.zeros((x.shape[0], 1, 1, 1), np.float32)
        for w in context_windows(x.shape[0], window, overlap, closed_loop=True):
            w = np.asarray(w)
            pred["u"][w] += np.asarray(den(x[w], t, jnp.zeros_like(cond), None, pose_feat[w]))
            pred["c"][w] += np.asarray(den(x[w], t, cond, kv, pose_feat[w]))
            counter[w] += 1
        u, c = pred["u"] / counter, pred["c"] / counter
        x = np.asarray(ddim_step(p.schedule, jnp.asarray(u + guidance * (c - u)), t, jnp.asarray(x), steps))
    return x


# The sampler call most tests here make (10 frames, 2 steps, windows of 4 overlapping by 1), so they
# run one compiled program (XLA compiles the sampler in ~10 s of a CI core).
SHARED_CALL = dict(width=WIDTH, height=HEIGHT, steps=2, context_frames=4, context_overlap=1)


def test_batched_jitted_sampler_equals_per_window_loop(components, inputs):
    ref, poses = inputs
    pipe = AnimatePipeline(**components)
    noise = np.random.default_rng(1).standard_normal((10, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
    # SHARED_CALL with Moore's guidance (the pipeline's default): also the program of the CLI test,
    # which asks for these modules' attention, "xla", to share it.
    out = pipe(ref, poses, **SHARED_CALL, guidance_scale=3.5, latents=noise, output_type="both")
    expected = _moore_style_loop(pipe, ref, poses, steps=2, guidance=3.5, latents=noise, window=4, overlap=1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out.latents, expected, atol=1e-4 * scale)
    assert out.frames.shape == (10, HEIGHT, WIDTH, 3) and out.frames.dtype == np.uint8


# Same seed on 1 and on 8 devices: only the reduction order of the sharded program differs.
MESH_TOL = Tol(rtol=2e-5, atol=2e-5)


def test_sharded_output_equals_single_device(components, inputs, devices):
    """Mesh invariance: the same seed gives the same latents per element, and the same video up to
    one uint8 level where a pixel sits on a rounding boundary."""
    ref, poses = inputs
    kw = dict(SHARED_CALL, seed=3, output_type="both")
    single = AnimatePipeline(**components)(ref, poses, **kw)
    mesh = parallel.make_mesh((8,), ("data",))
    # its own copy of the modules: sharding places their parameters on the mesh, which would give the
    # single-device pipelines of the later tests another program to compile
    sharded = AnimatePipeline(**tiny_components(), mesh=mesh)(ref, poses, **kw)
    assert_close(sharded.latents, single.latents, MESH_TOL, "latents, 8 devices vs 1")
    diff = np.abs(sharded.frames.astype(np.int16) - single.frames.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_decode_frames_splits_each_batch_over_the_mesh(components, devices, monkeypatch):
    from anim_jax.diffusion import sampling

    model = AnimatePipeline(**components).model
    latents = jax.random.normal(jax.random.key(0), (5, HEIGHT // 2, WIDTH // 2, 4))
    single = sampling.decode_frames(model, latents, 3)
    seen, decode = [], sampling._decode_uint8
    monkeypatch.setattr(sampling, "_decode_uint8", lambda vae, x: seen.append(x) or decode(vae, x))
    split = sampling.decode_frames(model, latents, 3, parallel.make_mesh((8,), ("data",)))
    # the batch of 3 rounded up to the 8 devices, one frame on each
    assert [x.shape[0] for x in seen] == [8] and len(seen[0].sharding.device_set) == 8
    assert seen[0].sharding.shard_shape(seen[0].shape)[0] == 1
    diff = np.abs(split.astype(np.int16) - single.astype(np.int16))
    assert split.shape == single.shape == (5, HEIGHT, WIDTH, 3) and diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_same_seed_same_video_and_seed_matters(components, inputs):
    ref, poses = inputs
    pipe = AnimatePipeline(**components)
    kw = dict(SHARED_CALL, output_type="frames")
    a, b = pipe(ref, poses, seed=5, **kw).frames, pipe(ref, poses, seed=5, **kw).frames
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, pipe(ref, poses, seed=6, **kw).frames)


def _sampler_inputs(seed: int, videos: int, frames: int):
    """Random ``sampling.sample`` inputs for ``videos`` videos: noise, reference, CLIP image, poses."""
    r = np.random.default_rng(seed)
    noise = jnp.asarray(r.standard_normal((videos, frames, HEIGHT // 2, WIDTH // 2, 4)), jnp.float32)
    ref = jnp.asarray(r.uniform(-1, 1, (videos, HEIGHT, WIDTH, 3)), jnp.float32)
    clip = jnp.asarray(r.integers(0, 256, (videos, 16, 16, 3)), jnp.uint8)
    poses = jnp.asarray(r.uniform(0, 1, (videos, frames, HEIGHT, WIDTH, 3)), jnp.float32)
    return noise, ref, clip, poses


def test_sampler_batches_videos_and_both_guidance_modes_agree(components):
    """Several videos in one sample() call (as validation runs it) equal one call per video, and
    CFG as one masked batched call equals two calls. The one-video calls are SHARED_CALL's program
    (the pipeline's, above)."""
    from anim_jax.diffusion import moore_inference_schedule, sampling
    from anim_jax.diffusion.windows import windows_array
    from anim_jax.models.animate_anyone import AnimateAnyone

    model = AnimateAnyone(**components)
    frames = 10
    noise, ref, clip, poses = _sampler_inputs(4, 2, frames)
    windows = windows_array(frames, SHARED_CALL["context_frames"], SHARED_CALL["context_overlap"], True)
    kw = dict(schedule=moore_inference_schedule(), steps=SHARED_CALL["steps"], guidance_scale=3.5, windows=windows)
    both = np.asarray(sampling.sample(model, noise, reference=ref, clip=clip, poses=poses, **kw))
    scale = np.abs(both).max()
    for i in range(2):
        one = sampling.sample(model, noise[i:i + 1], reference=ref[i:i + 1], clip=clip[i:i + 1],
                              poses=poses[i:i + 1], **kw)
        np.testing.assert_allclose(both[i], np.asarray(one)[0], atol=1e-5 * scale)
    assert np.abs(both[0] - both[1]).max() > 1e-2 * scale
    two_calls = sampling.sample(model, noise, reference=ref, clip=clip, poses=poses, batch_guidance=False, **kw)
    np.testing.assert_allclose(np.asarray(two_calls), both, atol=1e-5 * scale)


def test_sampler_steps_in_several_programs_equal_one(components):
    """``steps_per_call``: the DDIM steps split over programs (each picks its own timesteps from the
    schedule) give the one program's latents and trajectory, and the step callback counts every
    step once, in order."""
    from anim_jax.diffusion import moore_inference_schedule, sampling
    from anim_jax.models.animate_anyone import AnimateAnyone

    model = AnimateAnyone(**components)
    frames = 4
    noise, ref, clip, poses = _sampler_inputs(5, 1, frames)
    kw = dict(reference=ref, clip=clip, poses=poses, schedule=moore_inference_schedule(), steps=3, guidance_scale=3.5,
              trajectory=True)
    last, every = sampling.sample(model, noise, **kw)
    seen = []
    tick = seen.append
    last1, every1 = sampling.sample(model, noise, steps_per_call=2, callback=tick, **kw)
    jax.effects_barrier()
    scale = np.abs(np.asarray(last)).max()
    assert every1.shape == every.shape == (3, 1, frames, HEIGHT // 2, WIDTH // 2, 4)
    np.testing.assert_allclose(np.asarray(every1), np.asarray(every), atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(last1), np.asarray(last), atol=1e-5 * scale)
    assert np.abs(np.asarray(every[0] - every[2])).max() > 1e-2 * scale
    assert sorted(int(i) for i in seen) == [0, 1, 2]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="steps_per_call must be between 1 and steps"):
            sampling.sample(model, noise, steps_per_call=bad, **kw)


def test_window_groups_equal_one_batch_hold_less_and_split_over_the_mesh(components):
    """``window_batch``: the windows of a step in groups (one denoiser call per group, a scan over the
    groups) give the latents of all windows in one call; a group of 3 of the 4 windows pads the list
    with weight-0 windows. On the 8-device mesh a group of one 4-frame window would give each device
    half a frame row, so groups become two windows (the pipeline's default there:
    test_sharded_output_equals_single_device runs it). The compiled step holds fewer buffers with
    one window a call."""
    from anim_jax.diffusion import moore_inference_schedule, sampling
    from anim_jax.diffusion.windows import windows_array
    from anim_jax.models.animate_anyone import AnimateAnyone

    model = AnimateAnyone(**components)
    frames = 10
    noise, ref, clip, poses = _sampler_inputs(6, 1, frames)
    windows = windows_array(frames, 4, 1, True)  # starts 0, 3, 6, 9: four windows
    kw = dict(reference=ref, clip=clip, poses=poses, schedule=moore_inference_schedule(), steps=2, guidance_scale=3.5,
              windows=windows)
    whole = np.asarray(sampling.sample(model, noise, window_batch=None, **kw))
    scale = np.abs(whole).max()
    for group in (1, 3):
        np.testing.assert_allclose(np.asarray(sampling.sample(model, noise, window_batch=group, **kw)), whole,
                                   atol=1e-5 * scale, err_msg=f"window_batch={group}")
    mesh = parallel.make_mesh((8,), ("data",))
    assert sampling.window_group(4, 4, 1, mesh, 1) == 2 and sampling.window_group(4, 4, 1, mesh, 2) == 2
    assert sampling.window_group(4, 4, 1, None, 4) == 0 and sampling.window_group(4, 4, 1, None, None) == 0
    padded, weight, _ = sampling.prepare_windows(windows, frames, 1, None, 3)
    assert padded.shape == (6, 4) and weight.tolist() == [1, 1, 1, 1, 0, 0]

    def buffers(group):
        """The compiled DDIM program's temporary buffers, bytes."""
        padded, weight, count = sampling.prepare_windows(windows, frames, 1, None, group)
        cond = sampling._condition_jit(model, ref, clip, poses, mesh=None)
        lowered = sampling._denoise_jit.lower(model, noise, cond, padded, weight, count, jnp.float32(3.5),
                                              schedule=kw["schedule"], steps=2, window_batch=group)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    one, every = buffers(1), buffers(None)
    assert one < 0.5 * every, (one, every)
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        sampling.sample(model, noise, window_batch=0, **kw)


def test_changing_schedule_or_config_between_calls_changes_the_output(components, inputs):
    """Nothing is cached by name: the schedule and the modules' configs are part of what compiles."""
    import dataclasses

    ref, poses = inputs
    pipe = AnimatePipeline(**components)
    kw = dict(SHARED_CALL, seed=1, output_type="latents")
    base = pipe(ref, poses, **kw).latents
    schedule = pipe.schedule
    pipe.schedule = dataclasses.replace(schedule, prediction_type="epsilon", rescale_betas_zero_snr=False)
    other_schedule = pipe(ref, poses, **kw).latents
    pipe.schedule = schedule
    config = pipe.denoiser.config
    pipe.denoiser.config = dataclasses.replace(config, reference_fp16_rounding=not config.reference_fp16_rounding)
    try:
        other_config = pipe(ref, poses, **kw).latents
    finally:
        pipe.denoiser.config = config
    again = pipe(ref, poses, **kw).latents
    assert np.abs(other_schedule - base).max() > 1e-2 * np.abs(base).max()
    assert np.abs(other_config - base).max() > 0  # fp16 rounding of the reference: a small change
    np.testing.assert_array_equal(again, base)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(width=25, height=HEIGHT), "multiples of 2"), (dict(width=WIDTH, height=HEIGHT, num_frames=11), "only 10 pose"),
     (dict(width=WIDTH, height=HEIGHT, output_type="png"), "output_type"),
     (dict(width=WIDTH, height=HEIGHT, guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
     (dict(width=WIDTH, height=HEIGHT, guidance_scale=-1.0), "guidance_scale must be a finite number >= 0")],
)
def test_bad_call_arguments(components, inputs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnimatePipeline(**components)(*inputs, **kwargs)


def _write_pose_video(path, poses, fps=10):
    media.write_mp4(path, np.stack([media.resize_lanczos(media.to_rgb_image(p), 28, 36) for p in poses]), fps=fps)


def test_cli_animate_writes_mp4_gif_and_grid(components, inputs, tmp_path):
    ref, poses = inputs
    weights = tmp_path / "weights"
    save_components(weights, components, schedule=AnimatePipeline(**components).schedule)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    _write_pose_video(tmp_path / "pose.mp4", np.concatenate([poses, poses[:2]]))  # 12 frames, -L takes 10
    out = tmp_path / "out" / "video.mp4"
    rc = cli.main(["animate", "--weights", str(weights), "--reference", str(tmp_path / "ref.png"),
                   "--pose", str(tmp_path / "pose.mp4"), "--out", str(out), "-W", str(WIDTH), "-H", str(HEIGHT),
                   "-L", "10", "--steps", "2", "--context-frames", "4", "--context-overlap", "1",
                   "--grid", "--gif", "--no-progress", "--devices", "1", "--attention", "xla"])
    assert rc == 0
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        frames = [f for f in c.decode(s)]
        assert (s.width, s.height, len(frames), float(s.average_rate)) == (WIDTH, HEIGHT, 10, 10.0)
    with av.open(str(out.with_name("video_grid.mp4"))) as c:
        assert c.streams.video[0].width == 3 * WIDTH + 4
    with Image.open(out.with_suffix(".gif")) as g:
        assert g.n_frames == 10


def test_cli_animate_reports_bad_inputs(components, inputs, tmp_path, capsys):
    weights = tmp_path / "weights"
    save_components(weights, components, schedule=AnimatePipeline(**components).schedule)
    Image.fromarray(inputs[0]).save(tmp_path / "ref.png")
    _write_pose_video(tmp_path / "pose.mp4", inputs[1][:3])
    base = ["animate", "--weights", str(weights), "--out", str(tmp_path / "o.mp4"), "--no-progress", "--devices", "1"]
    cases = [
        (["--reference", str(tmp_path / "missing.png"), "--pose", str(tmp_path / "pose.mp4")], "missing.png"),
        (["--reference", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "pose.mp4"), "-W", "20", "-H", "33"],
         "multiples"),
        (["--reference", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "pose.mp4"), "-W", "24", "-H", "32",
          "-L", "5"], "only 3 pose frames"),
        (["--reference", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "nope.mp4")], "nope.mp4"),
        (["--reference", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "pose.mp4"), "--devices", "9"],
         "--devices 9: only 8 devices are present"),
        # this process's backends are up (a fresh `anim-jax animate` has none: tests/test_driving.py)
        (["--reference", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "pose.mp4"), "--cpu-devices", "2"],
         "--cpu-devices: CPU devices can only be set before JAX initialises its backends"),
    ]
    for extra, match in cases:
        assert cli.main(base + extra) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
    assert cli.main(["animate", "--weights", str(tmp_path / "nothing"), "--reference", "r.png", "--pose", "p.mp4",
                     "--out", str(tmp_path / "o.mp4"), "--devices", "1"]) == 2
    assert "anim-jax convert" in capsys.readouterr().err
