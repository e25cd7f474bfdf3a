"""Inference speed, memory and MFU of AnimatePipeline with random weights.

    python benchmarks/animate.py --full            # SD1.5 size, 512x768, 24 frames, 25 steps, bf16 (GPU)
    python benchmarks/animate.py                   # reduced size that runs on a CPU

Weights are random (timing does not depend on values); parameters are stored in the compute dtype,
as an inference deployment would. Reported:

* compile time of the sampling loop, then the wall time of a whole video (reference encoding,
  ReferenceNet, pose guider, the jitted denoising loop, VAE decode) and of the loop alone, per step;
* peak device memory (``memory_stats()['peak_bytes_in_use']``, GPU only);
* FLOPs: XLA's cost analysis of one denoising step (conditional + unconditional branch over all
  windows), taken on the HLO lowered for the CPU from shapes alone: after compilation for GPU,
  convolutions and fused attention are library calls that the analysis does not count. Times the number of
  steps; the once-per-video ReferenceNet, VAE and CLIP are not included. MFU = FLOPs / loop time / peak FLOP/s (the H100's
  dense bf16 peak, 989 TFLOP/s, unless --peak-tflops is given).
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

from anim_jax.models.attention_ops import AttentionConfig  # noqa: E402
from anim_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402
from anim_jax.models.motion import MotionConfig  # noqa: E402
from anim_jax.models.pose_guider import PoseGuider  # noqa: E402
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from anim_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from anim_jax.pipeline import AnimatePipeline  # noqa: E402

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, num_attention_heads=8,
                 cross_attention_dim=768)


def sizes(full: bool):
    if full:
        return dict(unet=SD15_UNET, motion=MotionConfig(), vae=VAEConfig(), clip=CLIPVisionConfig(),
                    pose=(320, (16, 32, 96, 256)))
    return dict(
        unet=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, num_attention_heads=2,
                  cross_attention_dim=32, norm_num_groups=8),
        motion=MotionConfig(num_attention_heads=2, norm_num_groups=8),
        vae=VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
        clip=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                              image_size=32, patch_size=8, projection_dim=32),
        pose=(32, (8, 8, 16, 16)),
    )


def build(size, dtype, attention):
    """Random-weight components (eager init draws with numpy: no per-shape compiles)."""
    unet = UNetConfig(**size["unet"], motion=size["motion"])
    ref = dataclasses.replace(unet, motion=None)
    makers = dict(
        denoiser=lambda r: UNet2DConditionModel(unet, dtype=dtype, param_dtype=dtype, attention=attention, rngs=r),
        reference_net=lambda r: UNet2DConditionModel(ref, reference_net=True, dtype=dtype, param_dtype=dtype,
                                                     attention=attention, rngs=r),
        pose_guider=lambda r: PoseGuider(*size["pose"], dtype=dtype, param_dtype=dtype, rngs=r),
        vae=lambda r: AutoencoderKL(size["vae"], dtype=dtype, param_dtype=dtype, attention=attention, rngs=r),
        image_encoder=lambda r: CLIPVisionModelWithProjection(size["clip"], dtype=dtype, param_dtype=dtype,
                                                              attention=attention, rngs=r),
    )
    out = {}
    for i, (name, make) in enumerate(makers.items()):
        out[name] = make(nnx.Rngs(i))
    return out


def count_step_flops(full: bool, dtype, latent_shape, pose_shape, windows) -> float:
    """FLOPs of one denoising step (both branches, all windows) from XLA's cost analysis of the HLO
    lowered for the CPU from shapes alone, with the plain einsum attention: the GPU lowering reports
    no cost analysis, and a fused cuDNN attention call cannot be lowered for the CPU."""
    size = sizes(full)
    unet = UNetConfig(**size["unet"], motion=size["motion"])
    den = nnx.eval_shape(lambda: UNet2DConditionModel(unet, dtype=dtype, param_dtype=dtype,
                                                      attention=AttentionConfig("xla"), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(den)
    flat = jnp.asarray(windows.reshape(-1))
    window = windows.shape[1]
    tokens = reference_token_shapes(den, latent_shape[1], latent_shape[2], dtype)

    # projected once per video, not per step
    kv = jax.eval_shape(lambda st, t: nnx.merge(graphdef, st).reference_kv(t), state, tokens)

    def one_step(state, x, pf, ctx, kv):
        d = nnx.merge(graphdef, state)
        xw, pw = x[flat], pf[flat]
        c = d(xw, 999, ctx, num_frames=window, reference=kv, pose_features=pw)
        u = d(xw, 999, jnp.zeros_like(ctx), num_frames=window, reference=None, pose_features=pw)
        return c, u

    args = (state, jax.ShapeDtypeStruct(latent_shape, jnp.float32), jax.ShapeDtypeStruct(pose_shape, dtype),
            jax.ShapeDtypeStruct((1, 1, unet.cross_attention_dim), dtype), kv)
    cost = jax.jit(one_step).trace(*args).lower(lowering_platforms=("cpu",)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:
        # Some jax builds (seen: 0.11.2 with CUDA) give no analysis for a cross-platform lowering;
        # a CPU-only process does.
        return _count_in_cpu_process(latent_shape, pose_shape, windows, dtype, full)
    return float(cost["flops"])


def _count_in_cpu_process(latent_shape, pose_shape, windows, dtype, full: bool) -> float:
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--count-flops", json.dumps(
        dict(latent=list(latent_shape), pose=list(pose_shape), frames=int(windows.max()) + 1,
             window=int(windows.shape[1]), dtype=jnp.dtype(dtype).name, full=full))]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def reference_token_shapes(den, h, w, dtype) -> dict:
    """``{block path: abstract reference tokens (1, Lr, C)}`` for a latent of h x w: each block's token
    count from its UNet level (``down_blocks.i`` and ``up_blocks.(L-1-i)`` at level i, the mid block at
    the lowest), in the form ``reference_kv`` takes."""
    levels = len(den.down_blocks)
    out = {}
    for path, block in den.named_transformer_blocks().items():
        kind, index = path.split(".")[:2]
        if kind == "down_blocks":
            level = int(index)
        elif kind == "up_blocks":
            level = levels - 1 - int(index)
        else:  # mid_block
            level = levels - 1
        res = _size(h, level) * _size(w, level)
        out[path] = jax.ShapeDtypeStruct((1, res, block.attn1.to_q.kernel.shape[0]), dtype)
    return out


def _size(n, level):
    for _ in range(level):
        n = (n + 1) // 2  # stride-2, pad-1, kernel-3 convs round up
    return n


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--count-flops":
        from anim_jax.diffusion.windows import windows_array

        a = json.loads(sys.argv[2])
        print(count_step_flops(a["full"], getattr(jnp, a["dtype"]), tuple(a["latent"]), tuple(a["pose"]),
                               windows_array(a["frames"], a["window"])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="SD1.5 size (needs a GPU)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    ap.add_argument("--attention", default="auto", choices=("xla", "chunked", "cudnn", "auto"))
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--guidance", default="batched", choices=("batched", "two-calls"),
                    help="CFG's conditional and unconditional branch in one denoiser call, or two")
    ap.add_argument("--json", default=None)
    ap.add_argument("--step-tflop", type=float, default=None,
                    help="FLOPs of one denoising step in TFLOP, counted before on a CPU host (skips the count here)")
    args = ap.parse_args()
    width = args.width or (512 if args.full else 64)
    height = args.height or (768 if args.full else 64)
    dtype = getattr(jnp, args.dtype or ("bfloat16" if args.full else "float32"))
    attention = AttentionConfig(args.attention)

    t0 = time.perf_counter()
    pipe = AnimatePipeline(**build(sizes(args.full), dtype, attention), batch_guidance=args.guidance == "batched")
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (args.frames, height, width, 3), dtype=np.uint8)
    kw = dict(width=width, height=height, steps=args.steps, guidance_scale=3.5, seed=0)

    t0 = time.perf_counter()
    pipe(ref, poses, **kw)  # compiles everything
    first_s = time.perf_counter() - t0
    totals, loops = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pipe(ref, poses, **kw)
        totals.append(time.perf_counter() - t0)
    # The loop alone: rerun the denoising scan with the conditioning computed once.
    from anim_jax.diffusion import sampling
    from anim_jax.diffusion.windows import windows_array
    from anim_jax.models.clip import clip_resize

    model = pipe.model
    f = pipe.vae_downscale
    x = jax.random.normal(jax.random.key(0), (1, args.frames, height // f, width // f, model.latent_channels))
    cond = nnx.jit(sampling.condition)(model, jnp.asarray(ref, jnp.float32)[None] / 127.5 - 1,
                                       clip_resize(ref, model.clip_size), jnp.asarray(poses, jnp.float32)[None] / 255)
    pf = cond.pose_features[0]
    windows, weight, count = sampling.prepare_windows(windows_array(args.frames), args.frames)
    loop = nnx.jit(sampling.denoise, static_argnames=("schedule", "steps", "batch_guidance"))
    run_loop = lambda: loop(model, x, cond, windows, weight, count, 3.5, schedule=pipe.schedule, steps=args.steps,
                            batch_guidance=pipe.batch_guidance).block_until_ready()
    run_loop()  # compiles
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_loop()
        loops.append(time.perf_counter() - t0)
    windows = windows_array(args.frames)
    x = x[0]

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    timing = dict(first_call_s=round(first_s, 2), video_s=round(min(totals), 3), loop_s=round(min(loops), 3),
                  peak_bytes_in_use=(stats or {}).get("peak_bytes_in_use"))
    print("timing:", json.dumps(timing), flush=True)
    if args.step_tflop is not None:
        step_flops = args.step_tflop * 1e12
    else:
        step_flops = count_step_flops(args.full, dtype, x.shape, pf.shape, windows)

    loop_s = min(loops)
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=dev.device_kind, platform=dev.platform, host=platform.processor() or platform.machine(),
        jax=jax.__version__, size="SD1.5" if args.full else "reduced", width=width, height=height,
        frames=args.frames, steps=args.steps, dtype=jnp.dtype(dtype).name, attention=args.attention,
        guidance=args.guidance,
        build_s=round(build_s, 2), first_call_s=round(first_s, 2), video_s=round(min(totals), 3),
        loop_s=round(loop_s, 3), step_ms=round(1000 * loop_s / args.steps, 2),
        step_gflop=round(step_flops / 1e9, 3), gflop_per_frame_both_branches=round(step_flops / 1e9 / args.frames, 3),
        achieved_tflops=round(step_flops * args.steps / loop_s / 1e12, 4),
        peak_memory_gib=round(stats["peak_bytes_in_use"] / 2**30, 2) if stats and "peak_bytes_in_use" in stats else None,
    )
    if args.full:
        result["mfu"] = round(step_flops * args.steps / loop_s / (args.peak_tflops * 1e12), 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
