"""The whole DWPose extractor (``PoseExtractor``: resize, letterbox, detector, NMS, affine crop, pose
network, SimCC decode), frames/s on one host, at DWPose's full sizes with random weights.

    python benchmarks/pose_extractor.py --batch 32 --frames 256             # GPU host (issue 13: >= 200 fps)
    python benchmarks/pose_extractor.py --batch 4 --frames 8 --json x.json  # CPU rehearsal

benchmarks/pose.py times the two networks alone; this one times what a user's video goes through.
Random weights detect nobody, so the detector's objectness bias is set very low and the extractor
runs in Moore's ``no_person="full_image"`` mode: every frame still takes one detector pass, an (empty)
NMS, one whole-frame affine crop and one pose pass, which is the one-person case of a dance video
(a real detection costs one NMS over a handful of boxes more). Frames: 512x768 (height x width,
Moore's driving size) uint8 noise, detection resize at DWPose's default (shorter side 512).
The first call (compiles) is timed separately from the measured call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(dtype):
    import jax.numpy as jnp
    from flax import nnx

    from anim_jax.pose.rtmpose import RTMPose, RTMPoseConfig
    from anim_jax.pose.yolox import YOLOX, YOLOXConfig

    dt = None if dtype == "float32" else jnp.dtype(dtype)
    detector = YOLOX(YOLOXConfig.yolox_l(), dtype=dt, rngs=nnx.Rngs(0))
    for level in detector.head.levels:  # nobody detected: objectness ~ sigmoid(-30)
        level.obj_pred.bias[...] = jnp.full_like(level.obj_pred.bias[...], -30.0)
    pose = RTMPose(RTMPoseConfig.dwpose_l_384(), dtype=dt, rngs=nnx.Rngs(1))
    return detector, pose


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="frames per device batch (default 32)")
    p.add_argument("--frames", type=int, default=256, help="frames in the timed call (default 256)")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", help="write the result here as JSON")
    args = p.parse_args()

    import jax
    import numpy as np

    from anim_jax.pose.extract import PoseExtractor

    detector, pose = build(args.dtype)
    ex = PoseExtractor(detector, pose, batch_size=args.batch, no_person="full_image")
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.height, args.width, 3), np.uint8)
    t0 = time.perf_counter()
    ex(frames[: ex.batch_size])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    poses = ex(frames)
    seconds = time.perf_counter() - t0
    assert len(poses) == args.frames
    stats = jax.devices()[0].memory_stats() or {}
    res = dict(
        date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        device=str(jax.devices()[0].device_kind), devices=jax.device_count(), jax=jax.__version__,
        host=platform.platform(), batch=ex.batch_size, frames=args.frames, size=[args.height, args.width],
        dtype=args.dtype, first_call_s=round(first, 2), seconds=round(seconds, 3),
        frames_per_s=round(args.frames / seconds, 1),
        device_peak_mib=round(stats.get("peak_bytes_in_use", 0) / 2**20),
    )
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
