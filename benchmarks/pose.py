"""DWPose's two networks: anim_jax (JAX) against onnxruntime's CPU provider, side by side.

    python benchmarks/pose.py                          # CPU, batch 1, every core, 5 interleaved rounds
    python benchmarks/pose.py --batch 4 --rounds 3 --threads 2 --cache /tmp/dwpose-bench
    python benchmarks/pose.py --jax-only --batch 32 --json pose.json   # GPU host: JAX alone + the extractor
    python benchmarks/pose.py --jax-only --batch 64 --dtype bfloat16

Both engines run the full-size networks of DWPose (YOLOX-L on 640x640 letterboxed frames, RTMPose-L
whole-body on 384x288 crops) with the same random weights: the PyTorch stand-ins of
``tests/dwpose_torch.py`` are randomised, exported with ``torch.onnx.export`` (as DWPose's files
were made: TorchScript exporter, BatchNorm folded) and converted with ``anim_jax.convert.dwpose``.
Each engine lives in its own worker process pinned to the same CPUs (onnxruntime with that many
intra-op threads, XLA's pool sized by the affinity), so peak memory (``ru_maxrss``) is per engine;
the parent alternates timed batches between the two, so both see the same machine load.

XLA_FLAGS and other environment variables reach the JAX worker unchanged (to try XLA:CPU options).
A frame is one detector pass plus one pose pass (one person per frame, DWPose's usual case for
dance videos). Letterboxing, NMS, crops and decoding (``anim_jax.pose.extract``) are not timed in
the side-by-side rows. The first (warm-up) batch also compares the two engines' outputs, which
checks the full-size conversion numerically. ``--cache DIR`` keeps the export and the conversion
(minutes on a small CPU) for the next run.

``--jax-only`` needs neither torch nor onnxruntime nor any file: random full-size networks run on
JAX's default backend (the GPU where there is one) through the extractor's own jitted functions
(``DeviceNetworks``: uint8 in, BGR flip and normalisation on the device), then the whole
extractor (``PoseExtractor.stream``: resize to Moore's detection size, letterbox, detector, NMS,
affine crops, pose network, SimCC decode, host work overlapped with the device) runs on synthetic
``--frame-size`` frames. Random weights find no person, so the extractor runs with
``no_person="full_image"``: every frame gets exactly one crop, as a one-dancer video does.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

from _hardware import cpu_name  # noqa: E402  (benchmarks run as scripts: their folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # dwpose_torch: the PyTorch stand-ins used as references

DET_HW = (640, 640)


def _inputs(batch: int, pose_hw, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = rng.uniform(0, 255, (batch, *DET_HW, 3)).astype(np.float32)
    crops = rng.standard_normal((batch, *pose_hw, 3)).astype(np.float32)
    return frames, crops


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Not ``ru_maxrss``: Linux carries that across the
    ``execve`` of a spawned worker, so each worker would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# Workers (one process per engine)


def _jax_worker(conn, args, weights_dir, cpus):
    if cpus:
        os.sched_setaffinity(0, cpus)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif args.device == "gpu":
        os.environ["JAX_PLATFORMS"] = "cuda"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    if weights_dir:
        from anim_jax.pose.networks import load_dwpose

        detector, pose_net = load_dwpose(weights_dir, dtype=dtype)
    else:  # --jax-only: random initialisation, no torch or onnxruntime needed
        from anim_jax.pose.rtmpose import RTMPose, RTMPoseConfig
        from anim_jax.pose.yolox import YOLOX, YOLOXConfig

        detector = YOLOX(YOLOXConfig.yolox_l(), dtype=dtype, rngs=nnx.Rngs(0))
        pose_net = RTMPose(RTMPoseConfig.dwpose_l_384(), dtype=dtype, rngs=nnx.Rngs(1))
    if args.jax_only:
        return _jax_only(conn, args, detector, pose_net)

    from anim_jax.pose import compile_options

    platform = jax.devices()[0].platform

    # Prepared and compiled as the extractor does (the detector's wide 3x3 convolutions as Winograd
    # convolutions on CPU unless --direct-conv; the pose network as it is).
    detector = compile_options.prepare(detector, platform, winograd=args.winograd)
    winograd = compile_options.winograd_layers(detector)

    def compiled(model):
        graphdef, state = nnx.split(model)
        return compile_options.jit(lambda s, x: nnx.merge(graphdef, s)(x), platform), state

    det_fn, det_state = compiled(detector)
    pose_fn, pose_state = compiled(pose_net)
    frames, crops = _inputs(args.batch, pose_net.config.input_size)
    t0 = time.perf_counter()
    det_out = jax.block_until_ready(det_fn(det_state, jnp.asarray(frames)))
    pose_out = jax.block_until_ready(pose_fn(pose_state, jnp.asarray(crops)))
    warm = time.perf_counter() - t0
    conn.send(dict(warmup_s=warm, device=str(jax.devices()[0].device_kind), winograd_layers=winograd,
                   outputs=[np.asarray(det_out), *(np.asarray(o) for o in pose_out)]))
    while conn.recv() == "run":
        t0 = time.perf_counter()
        jax.block_until_ready(det_fn(det_state, jnp.asarray(frames)))
        t1 = time.perf_counter()
        jax.block_until_ready(pose_fn(pose_state, jnp.asarray(crops)))
        conn.send((t1 - t0, time.perf_counter() - t1))
    conn.send(_memory(jax))


def _memory(jax) -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return dict(peak_rss_mib=_peak_rss_mib(), device_peak_mib=stats.get("peak_bytes_in_use", 0) / 2**20)


def _jax_only(conn, args, detector, pose_net):
    """The two networks through the extractor's jitted functions, then the whole extractor."""
    import jax
    import numpy as np

    from anim_jax.pose.extract import DeviceNetworks, PoseExtractor

    # Objectness logits of -30: no anchor passes the score threshold, so with no_person="full_image"
    # every frame gets one full-frame crop (the random detector would otherwise "find" hundreds).
    obj = [level.obj_pred.bias for level in detector.head.levels]
    for b in obj:
        b.value = b.value * 0 - 30.0
    nets = DeviceNetworks(detector, pose_net, batch_size=args.batch, winograd=args.winograd)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.batch, *DET_HW, 3), dtype=np.uint8)
    crops = rng.integers(0, 256, (args.batch, *pose_net.config.input_size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    det = nets.detect(frames)
    locs, vals = nets.estimate(crops)
    warm = time.perf_counter() - t0
    conn.send(dict(warmup_s=warm, device=str(jax.devices()[0].device_kind), devices=jax.device_count(),
                   winograd_layers=nets.winograd_layers,
                   outputs=[det, locs, vals]))
    while conn.recv() == "run":
        t0 = time.perf_counter()
        nets.detect(frames)  # waits for the result (np.asarray)
        t1 = time.perf_counter()
        nets.estimate(crops)
        conn.send((t1 - t0, time.perf_counter() - t1))
    extractor = PoseExtractor(None, None, networks=nets, no_person="full_image")
    result = {}
    n = args.extractor_batches * nets.batch_size
    if n:
        fh, fw = args.frame_size
        source = rng.integers(0, 256, (min(n, 16), fh, fw, 3), dtype=np.uint8)  # cycled: generating is not timed

        def items(count):
            return ((i, source[i % len(source)]) for i in range(count))

        for _ in extractor.stream(items(nets.batch_size)):  # warm-up: host pools, transfers
            pass
        t0 = time.perf_counter()
        got = sum(len(p.keypoints) for p in extractor.stream(items(n)))
        dt = time.perf_counter() - t0
        result = dict(extractor_frames=n, extractor_s=dt, extractor_fps=n / dt, extractor_persons=got,
                      frame_size=[fh, fw], workers=extractor.workers)
    conn.send({**_memory(jax), **result})


def _ort_worker(conn, args, onnx_paths, cpus):
    if cpus:
        os.sched_setaffinity(0, cpus)
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = len(cpus) if cpus else os.cpu_count()
    opts.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in onnx_paths]
    det, pose = sessions
    pose_hw = tuple(pose.get_inputs()[0].shape[2:4])
    frames, crops = _inputs(args.batch, pose_hw)
    frames = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))  # DWPose feeds NCHW; not timed
    crops = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))
    det_in, pose_in = det.get_inputs()[0].name, pose.get_inputs()[0].name
    t0 = time.perf_counter()
    det_out = det.run(None, {det_in: frames})
    pose_out = pose.run(None, {pose_in: crops})
    conn.send(dict(warmup_s=time.perf_counter() - t0, device="CPUExecutionProvider",
                   outputs=[det_out[0], *pose_out]))
    while conn.recv() == "run":
        t0 = time.perf_counter()
        det.run(None, {det_in: frames})
        t1 = time.perf_counter()
        pose.run(None, {pose_in: crops})
        conn.send((t1 - t0, time.perf_counter() - t1))
    conn.send(dict(peak_rss_mib=_peak_rss_mib(), device_peak_mib=0.0))


# ------------------------------------------------------------------------------------------------


def _prepare(workdir: str) -> tuple[list[str], str, dict]:
    """Full-size random stand-ins -> ONNX files -> converted directory, each step skipped where
    ``workdir`` (a ``--cache``) already holds its result."""
    from anim_jax import atomic
    from anim_jax.convert.dwpose import convert_dwpose

    times = {}
    paths = [os.path.join(workdir, "yolox_l.onnx"), os.path.join(workdir, "dw-ll_ucoco_384.onnx")]
    out = os.path.join(workdir, "dwpose")
    if not all(os.path.isfile(p) for p in paths):
        import torch
        from dwpose_torch import TorchRTMPose, TorchYOLOX, export_onnx, randomize_

        from anim_jax.pose.rtmpose import RTMPoseConfig
        from anim_jax.pose.yolox import YOLOXConfig

        t0 = time.perf_counter()
        pose_cfg = RTMPoseConfig.dwpose_l_384()
        det = export_onnx(randomize_(TorchYOLOX(YOLOXConfig.yolox_l()), seed=1), torch.zeros(1, 3, *DET_HW), ["output"])
        pose = export_onnx(randomize_(TorchRTMPose(pose_cfg), seed=2), torch.zeros(1, 3, *pose_cfg.input_size),
                           ["simcc_x", "simcc_y"])
        for path, data in zip(paths, (det, pose)):
            atomic.write_bytes(path, data)
        times["export_s"] = time.perf_counter() - t0
        if os.path.isdir(out):  # converted from other exports
            import shutil

            shutil.rmtree(out)
    if not os.path.isdir(out):
        t0 = time.perf_counter()
        convert_dwpose(paths[0], paths[1], out)
        times["convert_s"] = time.perf_counter() - t0
    return paths, out, times


def _agreement(a, b) -> float:
    import numpy as np

    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12)))
    return worst


def _frame_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 720x1280), got {text!r}") from None
    if h < 64 or w < 64:
        raise argparse.ArgumentTypeError(f"frames must be at least 64x64, got {text!r}")
    return h, w


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1, help="frames per batch (default 1; use >= 32 on a GPU)")
    p.add_argument("--rounds", type=int, default=5, help="timed batches per engine, interleaved (default 5)")
    p.add_argument("--threads", type=int, default=0, help="CPUs both engines are pinned to (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="JAX's platform (default: cpu beside onnxruntime, JAX's default backend with --jax-only)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="JAX compute dtype (parameters stay float32)")
    p.add_argument("--jax-only", action="store_true",
                   help="JAX alone with random weights, then the whole extractor: no torch, no onnxruntime, no files")
    p.add_argument("--extractor-batches", type=int, default=8,
                   help="with --jax-only: batches of synthetic frames through the whole extractor (default 8; 0: skip)")
    p.add_argument("--frame-size", type=_frame_size, default=(720, 1280),
                   help="with --jax-only: the synthetic source frames, HxW (default 720x1280)")
    p.add_argument("--direct-conv", dest="winograd", action="store_false", default=None,
                   help="XLA's direct 3x3 convolutions on CPU too (default: Winograd for the detector there, as the extractor)")
    p.add_argument("--cache", default=None,
                   help="directory keeping the ONNX export and its conversion between runs (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    if args.batch < 1 or args.rounds < 1 or args.threads < 0 or args.extractor_batches < 0:
        p.error("--batch and --rounds must be >= 1, --threads and --extractor-batches >= 0")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            p.error(f"--json {args.json!r}: folder {parent!r} does not exist")
        if os.path.isdir(args.json):
            p.error(f"--json {args.json!r} is a directory, expected a file path")
    if args.cache and os.path.exists(args.cache) and not os.path.isdir(args.cache):
        p.error(f"--cache {args.cache!r} exists and is not a directory")
    if args.device == "auto":
        args.device = None if args.jax_only else "cpu"
    return args


def main() -> None:
    args = _parse_args()
    available = sorted(os.sched_getaffinity(0))
    cpus = available[: args.threads] if args.threads else available
    pin = cpus if args.device == "cpu" else None
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pose-bench-") as tmp:
        prep = {}
        if args.jax_only:
            onnx_paths, weights = None, None
        else:
            workdir = args.cache or tmp
            os.makedirs(workdir, exist_ok=True)
            onnx_paths, weights, prep = _prepare(workdir)
        engines = {"anim_jax (JAX)": (_jax_worker, weights)}
        if not args.jax_only:
            engines["onnxruntime CPU"] = (_ort_worker, onnx_paths)
        conns, procs, info = {}, {}, {}
        for name, (fn, src) in engines.items():  # one at a time: warm-up/compile does not overlap
            parent, child = ctx.Pipe()
            procs[name] = ctx.Process(target=fn, args=(child, args, src, pin))
            procs[name].start()
            conns[name] = parent
            info[name] = parent.recv()
        times = {name: [] for name in engines}
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                conns[name].send("run")
                times[name].append(conns[name].recv())
        for name in engines:
            conns[name].send("stop")
            info[name].update(conns[name].recv())
            procs[name].join()

    jax_device = info["anim_jax (JAX)"]["device"]
    now = datetime.datetime.now(datetime.timezone.utc)
    report = dict(
        date=f"{now:%Y-%m-%d %H:%M} UTC", command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        batch=args.batch, rounds=args.rounds, dtype=args.dtype, jax_device=jax_device, cpu=cpu_name(),
        cpus_pinned=len(pin) if pin else None, platform=platform.platform(), load_average=os.getloadavg()[0],
        xla_flags=os.environ.get("XLA_FLAGS", ""), prepare=prep, engines={},
        winograd_layers=info["anim_jax (JAX)"]["winograd_layers"],
    )
    print(f"# DWPose networks, batch {args.batch}, {args.rounds} interleaved rounds, JAX on {jax_device} "
          f"{args.dtype}, {report['winograd_layers']} Winograd convolutions" + (f", {len(pin)} CPUs pinned ({cpu_name()})" if pin else ""))
    print(f"# {report['date']}, {platform.platform()}, load average {report['load_average']:.1f}")
    if prep:
        print("# " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in prep.items()))
    if len(engines) == 2:
        a, b = (info[n]["outputs"] for n in engines)
        report["agreement"] = _agreement(a, b)
        print(f"# outputs agree: max |JAX - onnxruntime| / max |onnxruntime| = {report['agreement']:.1e}")
    print("| engine | detector ms/frame | pose ms/frame | frames/s (median) | frames/s (best) | warm-up s |"
          " peak RSS MiB | device peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    fps = {}
    for name in engines:
        det = statistics.median(t[0] for t in times[name]) / args.batch
        pose = statistics.median(t[1] for t in times[name]) / args.batch
        totals = [(t[0] + t[1]) / args.batch for t in times[name]]
        fps[name] = 1 / statistics.median(totals)
        i = info[name]
        print(f"| {name} | {det * 1e3:.1f} | {pose * 1e3:.1f} | {fps[name]:.3f} | {1 / min(totals):.3f} |"
              f" {i['warmup_s']:.1f} | {i['peak_rss_mib']:.0f} | {i['device_peak_mib']:.0f} |")
        report["engines"][name] = dict(
            detector_ms_per_frame=det * 1e3, pose_ms_per_frame=pose * 1e3, fps_median=fps[name],
            fps_best=1 / min(totals), warmup_s=i["warmup_s"], peak_rss_mib=i["peak_rss_mib"],
            device_peak_mib=i["device_peak_mib"], batch_seconds=[list(t) for t in times[name]],
        )
    if len(fps) == 2:
        jax_fps, ort_fps = fps.values()
        report["ratio_jax_over_onnxruntime"] = jax_fps / ort_fps
        print(f"# ratio JAX / onnxruntime (median frames/s): {jax_fps / ort_fps:.2f}")
    ext = info["anim_jax (JAX)"]
    if "extractor_fps" in ext:
        keys = ("extractor_frames", "extractor_s", "extractor_fps", "extractor_persons", "frame_size", "workers")
        report["extractor"] = {k: ext[k] for k in keys}
        print(f"# whole extractor (PoseExtractor.stream, {ext['frame_size'][0]}x{ext['frame_size'][1]} frames, "
              f"{ext['workers']} host workers): {ext['extractor_frames']} frames in {ext['extractor_s']:.2f} s = "
              f"{ext['extractor_fps']:.1f} frames/s ({ext['extractor_persons']} persons)")
    if args.json:
        import json

        from anim_jax import atomic

        atomic.write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
