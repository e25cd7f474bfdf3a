"""Time and memory of the sampler with its DDIM steps split over programs (``steps_per_call``), CPU.

    python benchmarks/steps_per_call.py --weights WEIGHTS_DIR --size 256 --devices 2 --per-call 1,10 --repeats 2
    python benchmarks/steps_per_call.py --weights WEIGHTS_DIR --size 512 --devices 2 --per-call 1 --repeats 0

``WEIGHTS_DIR``: any converted weights directory (the side-by-side benchmark's tiny set is
``WORK/converted``). The settings of ``--per-call`` run in one process, alternating, each timed
``--repeats`` times after its first (compiling) call; the sampler alone (latents out) when
timing, the whole video (frames out) when ``--repeats 0``. Reported: the resident memory after
every step of each setting's first call, the medians, and the process's peak RSS (meaningful for
one setting at a time). ``--devices N``: N one-thread CPU devices, as ``anim-jax animate
--cpu-devices N``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

from _cpu_pipeline import cpu_pipeline, int_list, weights_error  # benchmarks run as scripts: their folder is on sys.path


def _rss_mib() -> int:
    return round(int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="converted weights directory")
    ap.add_argument("--size", type=int, default=256, help="width and height (default 256)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--devices", type=int, default=2, help="one-thread CPU devices (default 2)")
    ap.add_argument("--per-call", type=int_list(1), default=[1, 10], help="steps_per_call values (default 1,10)")
    ap.add_argument("--attention", default="auto", choices=("xla", "chunked", "flash", "auto"))
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per value after the first (0: memory only)")
    a = ap.parse_args(argv)
    if error := weights_error(a.weights):
        print(error, file=sys.stderr)
        return 2
    values = a.per_call
    if any(not 1 <= v <= a.steps for v in values):
        print(f"error: --per-call values must be between 1 and --steps ({a.steps}), got {','.join(map(str, values))}", file=sys.stderr)
        return 2

    pipe, _ = cpu_pipeline(a.weights, a.attention, a.devices)
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (a.size, a.size, 3), np.uint8)
    poses = rng.integers(0, 256, (a.frames, a.size, a.size, 3), np.uint8)
    kw = dict(width=a.size, height=a.size, num_frames=a.frames, steps=a.steps, guidance_scale=3.5, seed=42,
              output_type="latents" if a.repeats else "frames")
    rows = {v: dict(steps_per_call=v, first_call_rss_mib=[], seconds=[]) for v in values}
    for v in values:
        t0 = time.perf_counter()
        pipe(ref, poses, steps_per_call=v, on_step=lambda i, v=v: rows[v]["first_call_rss_mib"].append(_rss_mib()), **kw)
        rows[v]["first_call_s"] = round(time.perf_counter() - t0, 2)
    for _ in range(a.repeats):
        for v in values:
            t0 = time.perf_counter()
            pipe(ref, poses, steps_per_call=v, on_step=lambda i: None, **kw)  # the first call's program
            rows[v]["seconds"].append(round(time.perf_counter() - t0, 2))
    for row in rows.values():
        if row["seconds"]:
            row["median_s"] = statistics.median(row["seconds"])
    out = dict(size=a.size, frames=a.frames, steps=a.steps, devices=a.devices, jax=jax.__version__,
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), rows=list(rows.values()))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
