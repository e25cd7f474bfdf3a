"""The one sampler: DDIM over overlapping context windows with classifier-free guidance.

``sample(model, noise, reference=, clip=, poses=, ...)`` takes an ``AnimateAnyone`` (or any object
with its ``image_context``/``encode``/``reference``/``pose_features``/``predict_pair``/``decode``)
and runs, as jitted programs:

1. the once-per-video conditioning: CLIP token, ReferenceNet -> projected reference keys/values,
   PoseGuider features;
2. a ``lax.scan`` over the DDIM timesteps (all of them in one program unless ``steps_per_call``
   says fewer), each step: for each group of ``window_batch`` windows (default one; a ``lax.scan``
   over the groups), gather the group's frames of every video (the frame rows sharded over the
   mesh) and take the unconditional and conditional predictions (``predict_pair``); then their
   per-frame average over the windows covering each frame (weights: ``windows.window_weights``;
   padded windows weigh 0), guidance, the DDIM update. One window a call holds one window's
   activations, not all of them (512x512 x 96 frames: 353 against 1,722 MiB of buffers a device,
   benchmarks/window_buffers.py; benchmarks/RESULTS.md "Issue 19, CPU round 16"), at no cost in
   time on the CPU;
3. optionally the VAE decode (``decode=True``; the pipeline decodes in batches instead, see
   ``decode_frames``).

This is Moore-AnimateAnyone's ``Pose2VideoPipeline`` loop (tests/test_pipeline.py checks it
against a per-window loop written its way). The pipeline, training's validation, the demo and the
benchmarks all call it.

Jitting is correct by construction: each program is jitted with the model as an argument,
so the model's graph (its configs included) is part of the compilation cache key, and the
schedule, step count, steps per program, windows per call, mesh, guidance mode and progress
callback are static arguments. Changing any of them compiles a new program; nothing is cached by
name.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from anim_jax import cpu_codegen, parallel
from anim_jax.diffusion.ddim import ddim_step
from anim_jax.diffusion.schedules import NoiseSchedule
from anim_jax.diffusion.windows import pad_windows, window_weights
from anim_jax.models.animate_anyone import decode_images


class Conditioning(NamedTuple):
    """What a video is conditioned on, computed once: ``context`` (B, 1, D) CLIP tokens,
    ``reference`` ``{block path: ReferenceKV}`` (batch B or 1), ``pose_features`` (B, F, h, w, C0)."""

    context: jax.Array
    reference: dict
    pose_features: jax.Array


def condition(model, reference: jax.Array, clip: jax.Array, poses: jax.Array) -> Conditioning:
    """``reference`` (B, H, W, 3) in [-1, 1], ``clip`` (B, S, S, 3) uint8 (``clip.clip_resize``),
    ``poses`` (B, F, H, W, 3) in [0, 1] -> the ``Conditioning`` (Moore: the reference latent is the
    VAE mean; the ReferenceNet sees the conditional CLIP token)."""
    context = model.image_context(clip)
    return Conditioning(context, model.reference(model.encode(reference), context), model.pose_features(poses))


def _frame_sharding(mesh, ndim: int):
    if mesh is None:
        return None
    return parallel.batch_sharding(mesh, ndim, batch_axes=tuple(mesh.axis_names))


def denoise(model, noise: jax.Array, cond: Conditioning, windows: jax.Array, window_weight: jax.Array,
            frame_count: jax.Array, guidance_scale, *, schedule: NoiseSchedule, steps: int, mesh=None,
            batch_guidance: bool = True, callback: Callable[[Any], None] | None = None,
            trajectory: bool = False, first: jax.Array | int = 0, count: int | None = None,
            window_batch: int | None = None) -> jax.Array:
    """The sampling loop, traceable (``sample`` jits it). ``noise`` (B, F, h, w, C); ``windows``
    (W, L) frame indices, ``window_weight`` (W,) (0 for padding windows), ``frame_count`` (F,) the
    summed weight covering each frame. Runs DDIM steps ``first .. first + count - 1`` of the
    ``steps``-step schedule (default: all of them; ``first`` may be traced, so one program serves
    every run of ``count`` steps). ``window_batch``: windows per denoiser call (W a multiple of it;
    None: all W in one call). Returns the latents (B, F, h, w, C), float32; with ``trajectory`` the
    latents after every step run, (count, B, F, h, w, C)."""
    b, f = noise.shape[:2]
    n_win, length = windows.shape
    group = n_win if window_batch is None else int(window_batch)
    if n_win % group:
        raise ValueError(f"window_batch {group} does not divide the {n_win} windows")
    n_groups = n_win // group
    sharding = _frame_sharding(mesh, noise.ndim - 1)
    per_window = lambda x: jnp.repeat(x, group, axis=0) if x.shape[0] > 1 else x
    context = per_window(cond.context)
    reference = {p: None if r is None else r._replace(k=per_window(r.k), v=per_window(r.v))
                 for p, r in cond.reference.items()}
    # Each group of windows: its frame indices (G*L,) and each row's weight (B, G*L, 1, 1, 1).
    group_frames = windows.reshape(n_groups, group * length)
    group_weight = jnp.tile(jnp.repeat(window_weight.reshape(n_groups, group), length, axis=1)[:, None], (1, b, 1))
    group_weight = group_weight.reshape((n_groups, b, group * length, 1, 1, 1))

    def gather(x, flat):
        """(B, F, ...) -> (B*G, L, ...): the group's windows of every video, as the denoiser's videos."""
        rows = jnp.take(x, flat, axis=1).reshape((b * group * length,) + x.shape[2:])
        if sharding is not None:
            rows = jax.lax.with_sharding_constraint(rows, sharding)
        return rows.reshape((b * group, length) + x.shape[2:])

    def predictions(x, t):
        """The (unconditional, conditional) predictions averaged over the windows covering each frame,
        each (B, F, ...), as Moore averages before guiding: one denoiser call per group of windows."""
        def one_group(sums, inputs):
            flat, weight = inputs
            pair = model.predict_pair(gather(x, flat), t, context, reference=reference,
                                      pose_features=gather(cond.pose_features, flat), batched=batch_guidance)
            shape = (b, group * length) + x.shape[2:]
            return tuple(s.at[:, flat].add(p.reshape(shape) * weight) for s, p in zip(sums, pair)), None

        zero = (jnp.zeros(x.shape, jnp.float32),) * 2
        if n_groups == 1:
            sums = one_group(zero, (group_frames[0], group_weight[0]))[0]
        else:
            sums = jax.lax.scan(one_group, zero, (group_frames, group_weight))[0]
        return tuple(s / frame_count[None, :, None, None, None] for s in sums)

    def body(x, inputs):
        i, t = inputs
        u, c = predictions(x, t)
        x = ddim_step(schedule, u + guidance_scale * (c - u), t, x, steps)
        if callback is not None:
            # Unordered: ordered effects are refused on more than one device, and a step counter needs no order.
            jax.debug.callback(callback, i, ordered=False)
        return x, x if trajectory else None

    count = steps if count is None else count
    index = first + jnp.arange(count)
    timesteps = jnp.asarray(schedule.inference_timesteps(steps), jnp.int32)[index]
    out, every = jax.lax.scan(body, noise.astype(jnp.float32), (index, timesteps))
    return every if trajectory else out


def _conditioning(model, reference, clip, poses, *, mesh):
    if mesh is not None and poses.shape[1] % mesh.size == 0:
        # the pose guider's frames split over the devices too (otherwise every device ran all of them)
        poses = jax.lax.with_sharding_constraint(poses, NamedSharding(mesh, P(None, tuple(mesh.axis_names))))
    return condition(model, reference, clip, poses)


# The model passes as a pytree (it shares no submodules; its configs are static in the treedef).
# nnx's graph mode walked its ~1,500 variables in Python on every call: 113 ms a call against 23 ms
# (benchmarks/RESULTS.md, "Issue 19, CPU round 7"). cpu_codegen.jit: jax.jit with XLA:CPU's loops
# vectorised for the host's widest registers.
_condition_jit = cpu_codegen.jit(_conditioning, static_argnames=("mesh",))
_denoise_jit = cpu_codegen.jit(denoise, static_argnames=("schedule", "steps", "mesh", "batch_guidance", "callback",
                                                         "trajectory", "count", "window_batch"))
_decode_jit = cpu_codegen.jit(lambda model, x: model.decode(x))


def _steps(model, x, cond, windows, weight, frame_count, guidance_scale, *, schedule, steps, mesh, batch_guidance,
           callback, trajectory, per_call, window_batch):
    """Every DDIM step, ``per_call`` steps a program; with ``trajectory`` also the latents after each."""
    kw = dict(schedule=schedule, steps=steps, mesh=mesh, batch_guidance=batch_guidance, callback=callback,
              trajectory=trajectory, window_batch=window_batch)
    every = []
    for first in range(0, steps, per_call):
        count = min(per_call, steps - first)
        out = _denoise_jit(model, x, cond, windows, weight, frame_count, guidance_scale, first=jnp.int32(first),
                           count=count, **kw)
        x = out[-1] if trajectory else out
        every.append(out)
    return (x, jnp.concatenate(every)) if trajectory else (x, None)


def window_group(n_windows: int, length: int, batch: int = 1, mesh=None, window_batch: int | None = None) -> int:
    """Windows per denoiser call for ``window_batch`` asked: rounded up until a group's ``batch * G
    * L`` frame rows split evenly over the mesh's devices; all windows (0) where that reaches them."""
    if window_batch is None:
        return 0
    group = int(window_batch)
    if mesh is not None:
        group *= mesh.size // math.gcd(mesh.size, batch * group * length)
    return 0 if group >= n_windows else group


def prepare_windows(windows: np.ndarray | None, num_frames: int, batch: int = 1, mesh=None,
                    window_batch: int | None = None):
    """Host side of the windows: ``(windows (W', L) int32, window weights (W',), frame counts (F,))``.
    None: one window of all frames. The list is padded (weight-0 copies of window 0) until the
    ``batch * W' * L`` frame rows split evenly over a mesh's devices, and, with ``window_batch``,
    until W' is a multiple of its group (``window_group``)."""
    windows = np.arange(num_frames, dtype=np.int32)[None] if windows is None else np.asarray(windows, np.int32)
    frame_count = window_weights(windows, num_frames).astype(np.float32)
    group = window_group(windows.shape[0], windows.shape[1], batch, mesh, window_batch)
    if group:
        multiple = group
    else:
        multiple = 1 if mesh is None else mesh.size // math.gcd(mesh.size, batch * windows.shape[1])
    windows, weight = pad_windows(windows, multiple)
    return windows, weight, frame_count


def sample(model, noise, *, reference, clip, poses, schedule: NoiseSchedule, steps: int, guidance_scale: float = 3.5,
           windows: np.ndarray | None = None, mesh: jax.sharding.Mesh | None = None, batch_guidance: bool = True,
           callback: Callable[[Any], None] | None = None, decode: bool = False, trajectory: bool = False,
           steps_per_call: int | None = None, window_batch: int | None = 1):
    """B videos of F frames (see the module docstring).

    ``noise`` (B, F, h, w, C) float32; ``reference`` (B, H, W, 3) in [-1, 1]; ``clip`` (B, S, S, 3)
    uint8; ``poses`` (B, F, H, W, 3) in [0, 1]; ``windows`` (W, L) frame indices from
    ``windows.windows_array`` (None: one window of all F frames). ``mesh``: the windows' frame rows
    are sharded over all its axes (the window list is padded for an even split).
    ``batch_guidance``: the conditional and unconditional branch in one denoiser call (else two).
    ``callback(i)``: called on the host after DDIM step ``i`` (e.g. a progress bar; it is a static
    argument, so pass the same callable each time to reuse the compilation).
    Returns the latents (B, F, h, w, C) float32, or with ``decode`` the frames in [0, 1]; with
    ``trajectory`` a pair: that and the latents after every DDIM step, (steps, B, F, h, w, C) (to
    study how errors grow step by step, e.g. bf16 against fp32). ``steps_per_call``: DDIM steps per
    program (None: all of them); the numbers do not depend on it. Each extra program costs time
    (0.05-0.8 s at 256x256-512x512 on the CPU: benchmarks/steps_per_call.py). ``window_batch``:
    context windows per denoiser call (None: all windows of a step in one call); rounded up where
    a group's frame rows would not split evenly over the mesh (``window_group``)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if window_batch is not None and int(window_batch) < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    windows, weight, frame_count = prepare_windows(windows, noise.shape[1], noise.shape[0], mesh, window_batch)
    group = window_group(windows.shape[0], windows.shape[1], noise.shape[0], mesh, window_batch) or None
    steps = int(steps)
    per_call = steps if steps_per_call is None else int(steps_per_call)
    if not 1 <= per_call <= steps:
        raise ValueError(f"steps_per_call must be between 1 and steps ({steps}), got {steps_per_call}")
    # Under the mesh, layers that split their own loops over devices (the flash attention) see it.
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        cond = _condition_jit(model, reference, clip, poses, mesh=mesh)
        x, every = _steps(model, jnp.asarray(noise, jnp.float32), cond, windows, weight, frame_count,
                          jnp.float32(guidance_scale), schedule=schedule, steps=steps, mesh=mesh,
                          batch_guidance=bool(batch_guidance), callback=callback, trajectory=bool(trajectory),
                          per_call=per_call, window_batch=group)
        if decode:
            x = _decode_jit(model, x)
    return (x, every) if trajectory else x


@cpu_codegen.jit
def _decode_uint8(vae, latents):
    # The VAE alone, not the model: each call flattens what it is given (8 frames at 64x64: 53 ms a
    # call with the model, 26 ms with the VAE; benchmarks/RESULTS.md, "Issue 19, CPU round 8").
    return jnp.round(decode_images(vae, latents) * 255).astype(jnp.uint8)


def decode_frames(model, latents, batch_size: int = 8, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """(N, h, w, C) scaled latents -> (N, H, W, 3) uint8 frames, ``batch_size`` at a time (one
    compiled shape: the last batch is padded), so decoding a long video needs bounded memory. With a
    mesh, each batch's frames are split over its devices (the batch rounded up to a multiple of its
    size), as the sampler's are."""
    sharding = None
    if mesh is not None and mesh.size > 1:
        batch_size = -(-batch_size // mesh.size) * mesh.size
        sharding = _frame_sharding(mesh, latents.ndim)
    out = []
    for start in range(0, latents.shape[0], batch_size):
        chunk = jnp.asarray(latents[start:start + batch_size])
        n = chunk.shape[0]
        if n < batch_size:
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        if sharding is not None:
            chunk = jax.device_put(chunk, sharding)
        out.append(np.asarray(_decode_uint8(model.vae, chunk))[:n])
    return np.concatenate(out)
