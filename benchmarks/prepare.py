"""``anim-jax prepare --extract-poses`` throughput: videos/s, frames/s, and where the time goes.

    python benchmarks/prepare.py --json prepare.json                    # CPU, DWPose at 1/4 width
    python benchmarks/prepare.py --width 1 --videos 2 --frames 8 --json prepare_full.json   # real sizes
    python benchmarks/prepare.py --gpu --json $OUT/prepare_gpu.json     # GPU: real sizes (< 60 s)

What runs is ``data_pipelines.prepare.prepare(..., extract_poses=True)``, the code behind
``anim-jax prepare ROOT -o OUT --extract-poses --pose-weights DIR``, on copies of one synthetic
dancing-figure video (``data_pipelines.synthetic``, H.264 yuv420p, ``--size`` pixels; copies because
drawing the figures is slower than preparing them, and the work per frame does not depend on which
video it is). Nothing is fetched: DWPose's two
networks are built here with random weights, at DWPose's real input sizes (frames resized to shorter
side 512 for detection, the detector's 640x640 letterbox, 384x288 pose crops, 133 keypoints) and its
real structure (YOLOX-L, RTMPose-L), with every channel count times ``--width`` (1 = DWPose's own
networks, 54.2 M + 33.6 M parameters). The detector's output layers are set so that it finds exactly
one person in every frame (one pose pass per frame, as in a solo dance video); the pose network's
keypoint logits are scaled so that nearly every keypoint is confident and gets drawn. The weights are
drawn in numpy with fan-in scaling (activations stay finite through the deep random networks).

A warm-up run on one video of the same size compiles the networks first (the timed run reuses the
compiled programs: same batch shapes; the script checks that nothing compiled again). The timed run's
split comes from the report's ``stage_s`` (``data_pipelines.prepare``):
  pose_load     reading the converted networks and putting them on the devices;
  pose_extract  the extraction pass: decoding every video, DWPose's host steps (resize, letterbox, NMS,
                crops) and the two networks, overlapped as the extractor runs them;
  pose_save     writing the keypoint files;
  decode        decoding the videos again for the records;
  encode_frames JPEG-encoding the frames;  render  drawing the poses from the keypoints (Moore's
                rendering);  encode_poses  PNG-encoding the pose pictures;
  other         the rest of the wall time: the dataset writer (TFDS / ArrayRecord), listing, the report.
With ``--workers N > 0`` the records are made in N worker processes and decode/encode/render are
seconds summed over them (so they can exceed the wall time, and "other" is not computed).

A GPU image with jax, flax, opencv and pillow but without PyAV and TFDS (the project's device
machines) needs these wheels, 44 MB, made on a CPU host with pip (promise has no wheel; pip builds one):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl av==18.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 array-record==0.8.6 \
        dm-tree==0.1.10 immutabledict==4.3.1 toml==0.10.2
    python3 -m pip wheel --no-deps -w .whl promise==2.3

and there, before the script: ``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl``
and ``PYTHONPATH=/tmp/site``. (google-cloud-storage, which TFDS can use, is not needed: checked by
running the script with it blocked.)
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _hardware import cpu_name  # noqa: E402  (benchmarks run as scripts: their folder is on sys.path)

STAGES = ("pose_load", "pose_extract", "pose_save", "decode", "encode_frames", "render", "encode_poses")


def _configs(width: float):
    """YOLOX-L and RTMPose-L (DWPose's dw-ll_ucoco_384) with every channel count times ``width``."""
    from anim_jax.pose.rtmpose import RTMPoseConfig
    from anim_jax.pose.yolox import YOLOXConfig

    def ch(c):
        return max(4, int(round(c * width / 4)) * 4)

    det, pose = YOLOXConfig.yolox_l(), RTMPoseConfig.dwpose_l_384()
    det = YOLOXConfig(**{**det.to_dict(), "base_channels": ch(det.base_channels), "head_channels": ch(det.head_channels)})
    pose = RTMPoseConfig(**{**pose.to_dict(), "stem_channels": tuple(ch(c) for c in pose.stem_channels),
                            "stage_channels": tuple(ch(c) for c in pose.stage_channels)})  # fmt: skip
    return det, pose


def _random_network(build, seed: int):
    """Uniform random parameters with variance 1/fan-in, drawn in numpy (eager jax.random would
    compile one program per parameter shape)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    module = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)

    def draw(v):
        fan_in = int(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 1
        u = rng.random(v.shape, dtype=np.float32) * 2 - 1  # float32 draws: half the time of float64's
        return jnp.asarray(u * np.float32(np.sqrt(3.0 / fan_in)))

    nnx.update(module, jax.tree.map(draw, nnx.state(module, nnx.Param)))
    return module


def build_weights(out: str, width: float) -> dict:
    """Writes the random networks as a converted DWPose directory; returns their sizes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from anim_jax.pose.networks import save_dwpose
    from anim_jax.pose.rtmpose import RTMPose
    from anim_jax.pose.yolox import YOLOX

    det_cfg, pose_cfg = _configs(width)
    detector = _random_network(lambda: YOLOX(det_cfg, rngs=nnx.Rngs(0)), 0)
    for i, level in enumerate(detector.head.levels):
        for pred in (level.obj_pred, level.cls_pred, level.reg_pred):
            pred.kernel[...] = jnp.zeros_like(pred.kernel[...])  # outputs = biases, whatever the frame
        # Only the stride-32 level is confident, and its boxes are far larger than the frame, so all of
        # them overlap and NMS keeps exactly one: one person per frame.
        level.obj_pred.bias[...] = jnp.full((1,), 4.0 if i == 2 else -8.0)
        level.cls_pred.bias[...] = jnp.asarray(np.where(np.arange(det_cfg.num_classes) == 0, 4.0, -4.0), jnp.float32)
        level.reg_pred.bias[...] = jnp.array([0.5, 0.5, 5.0, 5.0])
    pose = _random_network(lambda: RTMPose(pose_cfg, rngs=nnx.Rngs(1)), 1)
    for cls in (pose.head.cls_x, pose.head.cls_y):
        cls.kernel[...] = cls.kernel[...] * 10.0  # SimCC maxima well above DWPose's 0.3: keypoints drawn

    def count(m):
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param))))

    save_dwpose(out, detector, pose)
    return {"detector": det_cfg.to_dict(), "pose": pose_cfg.to_dict(),
            "detector_params_m": count(detector) / 1e6, "pose_params_m": count(pose) / 1e6}  # fmt: skip


def _pose_stats(dataset: str) -> dict:
    """Persons per frame and the share of keypoints drawn (score > 0.3), from the stored keypoints."""
    import numpy as np

    from anim_jax.pose.extract import Poses
    from data_pipelines import dataset as dataset_lib

    src = dataset_lib.open_dataset(dataset)
    persons, drawn = [], []
    for i in range(len(src)):
        poses = Poses.load(io.BytesIO(src[i]["keypoints"]))
        persons.append(poses.num_persons)
        drawn.append(poses.scores[:, 0] > 0.3)
    return {"persons_per_frame": float(np.concatenate(persons).mean()),
            "keypoints_drawn": float(np.concatenate(drawn).mean())}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, metavar="PATH", help="write the results here (JSON)")
    p.add_argument("--gpu", action="store_true",
                   help="on a GPU host: JAX's default backend, and (unless given) --width 1 --videos 8 "
                        "--frames 16 --batch 32")  # fmt: skip
    p.add_argument("--width", type=float, default=None, help="channel multiplier of both networks (CPU default 0.25)")
    p.add_argument("--videos", type=int, default=None, help="videos in the timed run (CPU default 4)")
    p.add_argument("--frames", type=int, default=None, help="frames per video (CPU default 16)")
    p.add_argument("--size", default="768x512", metavar="HxW", help="video size (default 768x512, portrait)")
    p.add_argument("--batch", type=int, default=None, help="frames per device batch (CPU default 8)")
    p.add_argument("--workers", type=int, default=None,
                   help="record-writing processes (CPU default 0: in this process, so the split is exact)")
    args = p.parse_args()
    gpu_defaults = dict(width=1.0, videos=8, frames=16, batch=32, workers=0)
    cpu_defaults = dict(width=0.25, videos=4, frames=16, batch=8, workers=0)
    for k, v in (gpu_defaults if args.gpu else cpu_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    h, w = (int(x) for x in args.size.lower().split("x"))
    if not args.gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    out_dir = os.path.dirname(os.path.abspath(args.json))
    if not os.path.isdir(out_dir):
        p.error(f"--json {args.json}: folder {out_dir} does not exist")

    import jax

    from anim_jax.pose.extract import _compiled
    from data_pipelines.prepare import prepare
    from data_pipelines.synthetic import write_synthetic_videos

    result = {
        "date_utc": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        "host": {"cpu": cpu_name(), "cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                 "device": jax.devices()[0].device_kind, "devices": jax.local_device_count(),
                 "jax": jax.__version__, "load_average_start": os.getloadavg()[0]},
        "args": vars(args),
    }  # fmt: skip
    common = dict(extract_poses=True, pose_batch_size=args.batch, workers=args.workers, progress=False, verbose=False)
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        t0 = time.perf_counter()
        weights = os.path.join(tmp, "dwpose")
        result["networks"] = build_weights(weights, args.width)
        result["build_weights_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_synthetic_videos(os.path.join(tmp, "warm"), 1, seed=1, num_frames=args.frames, height=h, width=w, lossless=False)
        clips = os.path.join(tmp, "clips")
        (video, _), = write_synthetic_videos(clips, 1, num_frames=args.frames, height=h, width=w, lossless=False)
        for i in range(1, args.videos):
            shutil.copyfile(video, os.path.join(clips, f"copy_{i:03d}.mp4"))
        result["write_videos_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        warm = prepare(os.path.join(tmp, "warm"), os.path.join(tmp, "warm_ds"), pose_weights=weights, **common)
        result["warmup"] = {"wall_s": time.perf_counter() - t0, "stage_s": warm["stage_s"]}
        detect, estimate = _compiled()
        compiled = detect._cache_size(), estimate._cache_size()

        t0 = time.perf_counter()
        report = prepare(os.path.join(tmp, "clips"), os.path.join(tmp, "ds"), pose_weights=weights, **common)
        wall = time.perf_counter() - t0
        if (detect._cache_size(), estimate._cache_size()) != compiled:
            raise SystemExit("the timed run compiled the networks again: the warm-up did not cover its shapes")
        result["poses"] = _pose_stats(os.path.join(tmp, "ds"))
    if report["num_videos"] != args.videos:
        raise SystemExit(f"only {report['num_videos']} of {args.videos} videos were prepared: {report['skipped']}")
    stages = {k: report["stage_s"].get(k, 0.0) for k in STAGES}
    if args.workers == 0:
        stages["other"] = wall - sum(stages.values())
    frames = report["num_frames"]
    result["timed"] = {"videos": report["num_videos"], "frames": frames, "wall_s": wall,
                       "videos_per_s": report["num_videos"] / wall, "frames_per_s": frames / wall,
                       "stage_s": stages, "ms_per_frame": {k: 1000 * v / frames for k, v in stages.items()}}  # fmt: skip
    result["host"]["load_average_end"] = os.getloadavg()[0]
    tmp_json = args.json + ".part"
    with open(tmp_json, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp_json, args.json)

    t, n = result["timed"], result["networks"]
    print(f"# prepare --extract-poses, {args.videos} videos x {args.frames} frames {h}x{w}, width {args.width:g} "
          f"(detector {n['detector_params_m']:.1f} M, pose {n['pose_params_m']:.1f} M parameters), batch {args.batch}, "
          f"workers {args.workers}, {result['host']['device']} x{result['host']['devices']}, {result['host']['cpus']} CPUs "
          f"({result['host']['cpu']}), load average {result['host']['load_average_start']:.1f} -> "
          f"{result['host']['load_average_end']:.1f}")  # fmt: skip
    print(f"# warm-up (1 video, compiles): {result['warmup']['wall_s']:.1f} s; persons/frame "
          f"{result['poses']['persons_per_frame']:.2f}, keypoints drawn {100 * result['poses']['keypoints_drawn']:.0f}%")
    cols = list(t["stage_s"])
    print("| videos/s | frames/s | wall s | " + " | ".join(f"{c} ms/frame" for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    print(f"| {t['videos_per_s']:.3f} | {t['frames_per_s']:.2f} | {t['wall_s']:.1f} | "
          + " | ".join(f"{t['ms_per_frame'][c]:.0f}" for c in cols) + " |")
    print(f"# written to {args.json}")


if __name__ == "__main__":
    main()
