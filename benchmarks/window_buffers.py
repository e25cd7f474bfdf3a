"""The DDIM program's temporary buffers with the windows of a step in groups (``window_batch``), CPU.

    python benchmarks/window_buffers.py --weights WEIGHTS_DIR --size 512 --frames 96 --devices 2 --window-batch 1,0

``WEIGHTS_DIR``: any converted weights directory (the side-by-side benchmark's tiny set is
``WORK/converted``). For each ``--window-batch`` value (0: all windows in one call) the sampler's
DDIM program is compiled, not run, and XLA's own accounting of it is printed
(``Compiled.memory_analysis()``: temporary buffers a device, arguments, outputs) with the compile
time. ``--devices N``: N one-thread CPU devices, as ``anim-jax animate --cpu-devices N``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _cpu_pipeline import cpu_pipeline, int_list, weights_error  # benchmarks run as scripts: their folder is on sys.path


class _Compiled(Exception):
    """Stops the pipeline once its DDIM program is compiled."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="converted weights directory")
    ap.add_argument("--size", type=int, default=512, help="width and height (default 512)")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--devices", type=int, default=2, help="one-thread CPU devices (default 2)")
    ap.add_argument("--window-batch", type=int_list(0), default=[1, 0], help="windows per call, comma-separated; 0: all (default 1,0)")
    a = ap.parse_args(argv)
    if error := weights_error(a.weights):
        print(error, file=sys.stderr)
        return 2
    values = a.window_batch

    pipe, _ = cpu_pipeline(a.weights, "auto", a.devices)
    import jax
    import numpy as np

    from anim_jax.diffusion import sampling

    denoise = sampling._denoise_jit
    rows = []

    def compile_only(*args, **kwargs):
        t0 = time.perf_counter()
        m = denoise.lower(*args, **kwargs).compile().memory_analysis()
        rows.append(dict(window_batch=kwargs["window_batch"] or 0, windows=int(args[3].shape[0]),
                         temp_mib=round(m.temp_size_in_bytes / 2**20, 1),
                         argument_mib=round(m.argument_size_in_bytes / 2**20, 1),
                         output_mib=round(m.output_size_in_bytes / 2**20, 1),
                         compile_s=round(time.perf_counter() - t0, 1)))
        raise _Compiled

    sampling._denoise_jit = compile_only
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (a.size, a.size, 3), np.uint8)
    poses = rng.integers(0, 256, (a.frames, a.size, a.size, 3), np.uint8)
    try:
        for v in values:
            try:
                pipe(ref, poses, width=a.size, height=a.size, num_frames=a.frames, steps=a.steps, seed=42,
                     output_type="latents", window_batch=v or None)
            except _Compiled:
                pass
    finally:
        sampling._denoise_jit = denoise
    for r in rows:
        print(f"window_batch {r['window_batch']} ({r['windows']} windows): temporary buffers {r['temp_mib']} MiB a "
              f"device, arguments {r['argument_mib']} MiB, outputs {r['output_mib']} MiB, compile {r['compile_s']} s")
    print(json.dumps(dict(size=a.size, frames=a.frames, steps=a.steps, devices=a.devices, jax=jax.__version__, rows=rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
