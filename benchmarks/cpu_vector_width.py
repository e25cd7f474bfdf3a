"""The sampler's DDIM loop compiled for XLA:CPU vector widths side by side, in one process (CPU).

    python benchmarks/cpu_vector_width.py --weights WEIGHTS_DIR --size 256 --steps 2 --repeats 10
    python benchmarks/cpu_vector_width.py --weights WEIGHTS_DIR --size 256 --devices 2 --repeats 6

``WEIGHTS_DIR``: any converted weights directory (the side-by-side benchmark's tiny set is
``WORK/converted``). The conditioning runs once; the DDIM program (``--steps`` steps of a 10-step
schedule, guidance 3.5, one window of ``--frames`` frames) is lowered once and compiled once per
``--widths`` value (``xla_cpu_prefer_vector_width``, what ``anim_jax.cpu_codegen`` sets), then the
executables are called in turn ``--repeats`` times each, so every width sees the same machine
load. Reported: median and minimum seconds a call per width, and the largest difference of its
latents from the first width's. ``--devices N``: N one-thread CPU devices (one pinned thread
otherwise is up to the caller, e.g. ``taskset -c 0``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

from _cpu_pipeline import cpu_pipeline, int_list, weights_error  # benchmarks run as scripts: their folder is on sys.path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="converted weights directory")
    ap.add_argument("--size", type=int, default=256, help="width and height (default 256)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps a call, of a 10-step schedule (default 2)")
    ap.add_argument("--devices", type=int, default=1, help="one-thread CPU devices (default 1)")
    ap.add_argument("--widths", type=int_list(1), default=[256, 512], help="vector widths in bits (default 256,512)")
    ap.add_argument("--attention", default="auto", choices=("xla", "chunked", "flash", "auto"),
                    help="attention implementation (default auto, as anim-jax animate)")
    ap.add_argument("--repeats", type=int, default=6, help="timed calls per width (default 6)")
    a = ap.parse_args(argv)
    if error := weights_error(a.weights):
        print(error, file=sys.stderr)
        return 2
    widths = a.widths
    if a.size % 8 or a.size < 8 or not 1 <= a.steps <= 10 or a.repeats < 1:
        print("error: --size must be a positive multiple of 8, --steps 1-10 and --repeats >= 1", file=sys.stderr)
        return 2

    pipe, mesh = cpu_pipeline(a.weights, a.attention, a.devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from anim_jax import cpu_codegen
    from anim_jax.diffusion import sampling

    rng = np.random.default_rng(0)
    s, f = a.size, a.frames
    ref = jnp.asarray(rng.random((1, s, s, 3)) * 2 - 1, jnp.float32)
    clip = jnp.asarray(rng.integers(0, 256, (1, 224, 224, 3)), jnp.uint8)
    poses = jnp.asarray(rng.random((1, f, s, s, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((1, f, s // 8, s // 8, 4)), jnp.float32)
    windows, weight, frame_count = sampling.prepare_windows(None, f, 1, mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        cond = sampling._condition_jit(pipe.model, ref, clip, poses, mesh=mesh)
        args = (pipe.model, noise, cond, windows, weight, frame_count, jnp.float32(3.5))
        static = dict(schedule=pipe.schedule, steps=10, mesh=mesh, batch_guidance=True, callback=None,
                      trajectory=False, count=a.steps)
        lowered = sampling._denoise_jit.lower(*args, first=jnp.int32(0), **static)
        programs, compile_s = {}, {}
        for w in widths:
            t0 = time.perf_counter()
            programs[w] = lowered.compile(compiler_options={cpu_codegen.VECTOR_WIDTH_OPTION: w})
            compile_s[w] = round(time.perf_counter() - t0, 1)
        first = {w: np.asarray(p(*args, first=jnp.int32(0))) for w, p in programs.items()}
        seconds = {w: [] for w in widths}
        for _ in range(a.repeats):
            for w, p in programs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(p(*args, first=jnp.int32(0)))
                seconds[w].append(round(time.perf_counter() - t0, 3))
    rows = [dict(width=w, compile_s=compile_s[w], median_s=round(statistics.median(seconds[w]), 3), min_s=min(seconds[w]),
                 seconds=seconds[w], max_abs_diff=float(np.abs(first[w] - first[widths[0]]).max())) for w in widths]
    print(json.dumps(dict(size=s, frames=f, steps=a.steps, devices=a.devices, attention=a.attention,
                          host_vector_bits=cpu_codegen.host_vector_bits(), jax=jax.__version__, rows=rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
