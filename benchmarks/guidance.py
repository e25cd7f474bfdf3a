"""Classifier-free guidance: one batched denoiser call on [uncond; cond] vs two calls, per step.

    python benchmarks/guidance.py                  # tiny and mid sizes on this machine's default device
    python benchmarks/guidance.py --sizes mid --repeats 5

Times ``diffusion.sampling.denoise`` (the jitted DDIM scan over all context windows, conditioning
computed once beforehand) with ``batch_guidance=True`` and ``False`` on the same random-weight
model and inputs. Runs alternate between the two modes so that a change in machine load hits
both. Reported per mode: the best wall time, and the best process CPU time (user + system, all
threads), which is less sensitive to other jobs on a shared machine. Both modes give the same
latents up to float32 rounding (checked here).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anim_jax.diffusion import moore_inference_schedule, sampling  # noqa: E402
from anim_jax.diffusion.windows import windows_array  # noqa: E402
from anim_jax.models.animate_anyone import AnimateAnyone  # noqa: E402
from anim_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402
from anim_jax.models.motion import MotionConfig  # noqa: E402
from anim_jax.models.pose_guider import PoseGuider  # noqa: E402
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from anim_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

# name: UNet widths, image side, frames, context window
SIZES = {
    "tiny": dict(channels=(32, 64), side=64, frames=8, window=8),
    "mid": dict(channels=(64, 128, 128), side=128, frames=16, window=8),
}


def build(channels) -> AnimateAnyone:
    unet = UNetConfig(block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1), layers_per_block=1,
                      num_attention_heads=2, cross_attention_dim=32, norm_num_groups=8,
                      motion=MotionConfig(num_attention_heads=2, norm_num_groups=8, levels=tuple(range(len(channels)))))
    r = nnx.Rngs(0)
    return AnimateAnyone(
        denoiser=UNet2DConditionModel(unet, rngs=r),
        reference_net=UNet2DConditionModel(dataclasses.replace(unet, motion=None), reference_net=True, rngs=r),
        pose_guider=PoseGuider(channels[0], (8, 8, 16, 16), rngs=r),
        vae=AutoencoderKL(VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4), rngs=r),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=32, patch_size=8,
            projection_dim=32), rngs=r),
    )


def measure(name: str, steps: int, repeats: int) -> dict:
    s = SIZES[name]
    model = build(s["channels"])
    side, frames = s["side"], s["frames"]
    rng = np.random.default_rng(0)
    ref = jnp.asarray(rng.uniform(-1, 1, (1, side, side, 3)), jnp.float32)
    clip = jnp.asarray(rng.integers(0, 256, (1, 32, 32, 3)), jnp.uint8)
    poses = jnp.asarray(rng.uniform(0, 1, (1, frames, side, side, 3)), jnp.float32)
    cond = nnx.jit(sampling.condition)(model, ref, clip, poses)
    d = model.latent_downscale
    noise = jax.random.normal(jax.random.key(0), (1, frames, side // d, side // d, model.latent_channels))
    windows, weight, count = sampling.prepare_windows(windows_array(frames, s["window"], 2), frames)
    loop = nnx.jit(sampling.denoise, static_argnames=("schedule", "steps", "batch_guidance"))
    schedule = moore_inference_schedule()
    run = lambda batched: loop(model, noise, cond, windows, weight, count, 3.5, schedule=schedule, steps=steps,
                               batch_guidance=batched).block_until_ready()
    out = {m: run(m) for m in (True, False)}  # compiles both
    scale = float(jnp.abs(out[False]).max())
    diff = float(jnp.abs(out[True] - out[False]).max()) / scale
    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    for _ in range(repeats):
        for mode in (True, False):
            t0, c0 = time.perf_counter(), time.process_time()
            run(mode)
            wall[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    res = dict(size=name, **{k: v for k, v in s.items()}, windows=int(windows.shape[0]), steps=steps,
               max_rel_diff=diff)
    for mode, label in ((True, "batched"), (False, "two_calls")):
        res[f"{label}_wall_ms_per_step"] = round(1000 * min(wall[mode]) / steps, 2)
        res[f"{label}_cpu_ms_per_step"] = round(1000 * min(cpu[mode]) / steps, 2)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = jax.devices()[0]
    head = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=dev.device_kind,
                platform=dev.platform, host=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, jax=jax.__version__)
    print(json.dumps(head))
    for name in args.sizes:
        print(json.dumps(measure(name, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
