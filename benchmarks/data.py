"""Data-pipeline throughput: stage-2 clips (24 frames, 512x512) per second and MB/s, per CPU worker.

    python benchmarks/data.py                      # defaults: 4 synthetic 512x512 videos of 100 frames
    python benchmarks/data.py --workers 1 2 4 --seconds 30 --noise 4

What it measures, on a dataset it builds itself in a temporary directory (synthetic characters at
``--size``; ``--noise`` adds Gaussian camera-like noise so the JPEGs are as large as real footage):

Square 512x512 video needs no resize (stage 2's crop is the whole frame); portrait video
(``--height 704``, DWPose's size) is centre-cropped to aspect 0.9 and resized, which costs more.

1. ``sampler``: one process, one thread, no Grain: the per-clip CPU cost of reading the record,
   decoding 25 JPEGs + 24 PNGs, cropping/resizing and converting to float32 (the work one worker does).
2. ``grain`` with N worker processes (``mp_prefetch``), batch 1 (Moore's stage-2 per-device batch),
   after a warm-up: what the training loop receives, including the transfer out of the workers.

MB/s is given twice: encoded input bytes decoded per second, and output bytes produced (float32,
or uint8 with ``uint8_output``, which leaves the float conversion to the accelerator).
The target (issue 5) is >= 2 clips/s per CPU worker.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (google/grain#1355)

import numpy as np  # noqa: E402

from data_pipelines import dataset as dataset_lib  # noqa: E402
from data_pipelines import grain_pipeline as G  # noqa: E402
from data_pipelines import synthetic  # noqa: E402
from data_pipelines.video_io import decode_pil  # noqa: E402

from _hardware import cpu_name  # noqa: E402  (benchmarks run as scripts: their folder is on sys.path)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid) -> float:
    """utime + stime of one process (Linux /proc), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _children() -> list[int]:
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _clip_bytes(cfg) -> int:
    h, w = cfg.resolution
    f = cfg.n_frames
    return (1 if cfg.uint8_output else 4) * (2 * f * h * w * 3 + h * w * 3) + cfg.clip_size**2 * 3


def bench_sampler(cfg, src, seconds):
    sampler = G.Sampler(cfg, src)
    n, enc, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    decode_s = 0.0
    while time.perf_counter() - t0 < seconds or n < 3:
        idx = n % len(src)
        rec = src[idx]
        rng = G.element_rng(cfg.seed, 0, n)
        # the encoded bytes this clip decodes (same draws as the sampler makes)
        frame_idx, ref = G.stage2_indices(np.random.default_rng((cfg.seed, 0, n)), int(rec["num_frames"]), cfg.n_frames, cfg.sample_rate)
        enc += sum(len(rec["frames"][i]) + len(rec["poses"][i]) for i in frame_idx) + len(rec["frames"][ref])
        sampler.sample(rec, rng, idx)
        n += 1
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    # decode-only share, on the last record
    t1 = time.perf_counter()
    for i in frame_idx:
        decode_pil(rec["frames"][i])
        decode_pil(rec["poses"][i])
    decode_s = time.perf_counter() - t1
    return {"clips": n, "seconds": dt, "clips_per_s": n / dt, "clips_per_cpu_s": n / cpu, "in_mb_per_s": enc / dt / 1e6,
            "out_mb_per_s": n * _clip_bytes(cfg) / dt / 1e6, "decode_ms_per_clip": 1000 * decode_s}  # fmt: skip


def bench_grain(cfg, workers, seconds, warmup):
    cfg = G.data_config(cfg, num_workers=workers, batch_size=1, read_threads=1, prefetch=2)
    shape = (1, cfg.n_frames, *cfg.resolution, 3)
    t_start = time.perf_counter()
    it = G.make_iterator(cfg, process_index=0, process_count=1)
    try:
        for _ in range(warmup):
            next(it)
        startup = time.perf_counter() - t_start
        kids = _children()
        k0 = {k: _cpu_seconds(k) for k in kids}
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds or n < 3:
            b = next(it)
            assert b["frames"].shape == shape
            n += 1
        dt = time.perf_counter() - t0
        main_cpu = time.process_time() - c0
        worker_cpu = sum(_cpu_seconds(k) - k0[k] for k in kids)
    finally:
        if hasattr(it, "close"):
            it.close()
    return {"workers": workers, "uint8_output": cfg.uint8_output, "clips": n, "seconds": dt, "clips_per_s": n / dt,
            "clips_per_s_per_worker": n / dt / max(workers, 1), "out_mb_per_s": n * _clip_bytes(cfg) / dt / 1e6,
            "startup_s": startup, "main_cpu_s_per_clip": main_cpu / n, "worker_cpu_s_per_clip": worker_cpu / n}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--frames", type=int, default=100, help="frames per video (>= 93 for a full stride-4 clip)")
    ap.add_argument("--size", type=int, default=512, help="video width (and height unless --height)")
    ap.add_argument("--height", type=int, default=None, help="video height, e.g. 704 for DWPose-like portrait video")
    ap.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma added to the frames")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="grain worker counts to try (0: in-process)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    ap.add_argument("--warmup", type=int, default=4, help="batches taken before timing (worker start-up)")
    ap.add_argument("--formats", nargs="+", choices=("float32", "uint8"), default=["float32", "uint8"],
                    help="element image dtype: float32 (the default format) or uint8 (uint8_output=True)")
    ap.add_argument("--data", default=None, help="use/keep the dataset here instead of a temporary directory")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    args = ap.parse_args()

    height = args.height or args.size
    tmp = None
    path = args.data
    if path is None:
        tmp = tempfile.mkdtemp(prefix="anim_jax_bench_data_")
        path = os.path.join(tmp, "ds")
    try:
        build_s = None
        if not dataset_lib.is_complete(path):
            t = time.perf_counter()
            examples = synthetic.synthetic_examples(
                args.videos, seed=0, num_frames=args.frames, height=height, width=args.size, fps=30.0, noise=args.noise
            )
            dataset_lib.build_dataset(path, examples)
            build_s = time.perf_counter() - t
        src = dataset_lib.open_dataset(path)
        r0 = src[0]
        jpeg_kb = np.mean([len(b) for b in r0["frames"]]) / 1e3
        png_kb = np.mean([len(b) for b in r0["poses"]]) / 1e3
        cfg = G.DataConfig(path=path, stage=2, resolution=512, n_frames=24, sample_rate=4, seed=0)

        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "dataset": {"videos": len(src), "frames": int(r0["num_frames"]), "height": height, "width": args.size, "noise": args.noise,
                        "jpeg_kb": round(float(jpeg_kb), 1), "png_kb": round(float(png_kb), 1),
                        "build_s": None if build_s is None else round(build_s, 1)},  # fmt: skip
            "clip_mb": _clip_bytes(cfg) / 1e6,
            "load_before": tuple(round(x, 2) for x in os.getloadavg()),
        }
        print(f"dataset: {results['dataset']}", flush=True)
        results["sampler"], results["grain"] = {}, []
        for fmt in args.formats:
            fcfg = G.data_config(cfg, uint8_output=fmt == "uint8")
            results["sampler"][fmt] = bench_sampler(fcfg, src, args.seconds)
            print(f"sampler {fmt} (1 process, no grain): {results['sampler'][fmt]}", flush=True)
            for w in args.workers:
                r = bench_grain(fcfg, w, args.seconds, args.warmup)
                print(f"grain {fmt}: {r}", flush=True)
                results["grain"].append(r)

        print()
        print(f"{results['date']}; {results['cpu']}, {results['cores']} cores; `{results['command']}`")
        print(f"dataset: {len(src)} videos x {r0['num_frames']} frames, {height}x{args.size} (HxW), noise {args.noise}, "
              f"JPEG {jpeg_kb:.0f} kB/frame, PNG {png_kb:.0f} kB/pose; a clip is {results['clip_mb']:.0f} MB as float32")  # fmt: skip
        print()
        print("| output | measurement | clips/s (wall) | clips per CPU-second of one worker | main-process CPU s/clip | MB/s in (encoded) | MB/s out |")
        print("|---|---|---|---|---|---|---|")
        for fmt in args.formats:
            s = results["sampler"][fmt]
            print(f"| {fmt} | sampler, 1 process, no Grain | {s['clips_per_s']:.2f} | {s['clips_per_cpu_s']:.2f} | - | "
                  f"{s['in_mb_per_s']:.1f} | {s['out_mb_per_s']:.0f} |")  # fmt: skip
            for r in results["grain"]:
                if r["uint8_output"] != (fmt == "uint8"):
                    continue
                w = r["workers"]
                label = f"Grain, {w} worker process{'es' if w != 1 else ''}" if w else "Grain, in-process"
                per_worker = 1 / r["worker_cpu_s_per_clip"] if r["worker_cpu_s_per_clip"] else float("nan")
                print(f"| {fmt} | {label} | {r['clips_per_s']:.2f} | {per_worker:.2f} | {r['main_cpu_s_per_clip']:.3f} | "
                      f"{r['clips_per_s'] * s['in_mb_per_s'] / s['clips_per_s']:.1f} | {r['out_mb_per_s']:.0f} |")  # fmt: skip
        print(f"load average before/after: {results['load_before']} / {os.getloadavg()}")
        if args.json:
            dataset_lib.write_json(args.json, results)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
