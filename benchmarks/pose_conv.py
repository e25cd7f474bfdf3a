"""DWPose's 3x3 stride-1 convolutions on CPU: XLA's direct convolution against Winograd F(4x4, 3x3).

    taskset -c 0 python benchmarks/pose_conv.py            # one CPU
    python benchmarks/pose_conv.py --repeats 9 --batch 4

Every distinct 3x3 stride-1 layer shape of the full-size networks (YOLOX-L on 640x640, RTMPose-L on
384x288; found by tracing them abstractly) is timed alone with random inputs, both ways, calls
alternating, each jitted as the extractor compiles the networks (``anim_jax.pose.compile_options``);
the Winograd kernel transform is done once beforehand, as ``use_winograd`` does. Prints one row per
shape (how many layers have it, milliseconds per call, the speed-up, each algorithm's largest error
against a float64 convolution relative to its largest output) and the count-weighted totals, with and
without the channel threshold that ``use_winograd`` applies. Then the whole YOLOX-L (random weights,
one 640x640 batch) as it is and as ``compile_options.prepare`` makes it for CPU, calls alternating.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import sys
import time

from _hardware import cpu_name  # noqa: E402  (benchmarks run as scripts: their folder is on sys.path)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _layer_shapes(batch: int) -> collections.Counter:
    """(network, B, H, W, C, K) -> count, for each 3x3 stride-1 dense ConvAct call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from anim_jax.pose import layers
    from anim_jax.pose.rtmpose import RTMPose, RTMPoseConfig
    from anim_jax.pose.yolox import YOLOX, YOLOXConfig

    seen, current = collections.Counter(), [""]
    call = layers.ConvAct.__call__

    def recording(self, x):
        kh, kw, _, k = self.kernel.shape
        if (kh, kw, self.stride, self.groups) == (3, 3, 1, 1):
            seen[(current[0], *x.shape, k)] += 1
        return call(self, x)

    layers.ConvAct.__call__ = recording
    try:
        for name, make, hw in (("YOLOX-L", lambda: YOLOX(YOLOXConfig.yolox_l(), rngs=nnx.Rngs(0)), (640, 640)),
                               ("RTMPose-L", lambda: RTMPose(RTMPoseConfig.dwpose_l_384(), rngs=nnx.Rngs(0)), (384, 288))):
            current[0] = name
            model = nnx.eval_shape(make)
            graph, state = nnx.split(model)
            jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32))
    finally:
        layers.ConvAct.__call__ = call
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per shape and algorithm (default 7)")
    p.add_argument("--network-repeats", type=int, default=5,
                   help="timed calls of the whole detector each way (default 5; 0: skip)")
    args = p.parse_args()
    if args.batch < 1 or args.repeats < 1 or args.network_repeats < 0:
        p.error("--batch and --repeats must be >= 1, --network-repeats >= 0")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from anim_jax.pose import compile_options, winograd
    from anim_jax.pose.layers import WINOGRAD_MIN_CHANNELS

    def direct(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fns = {"direct": compile_options.jit(direct, "cpu"), "winograd": compile_options.jit(winograd.conv3x3, "cpu")}
    shapes = _layer_shapes(args.batch)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# 3x3 stride-1 convolutions of DWPose, batch {args.batch}, median of {args.repeats}; {now:%Y-%m-%d %H:%M} UTC")
    print(f"# {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs in affinity, {platform.platform()}, jax {jax.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| network | input (B, H, W, C) -> K | layers | direct ms | Winograd ms | speed-up | max error / max: direct, Winograd |")
    print("|---|---|---:|---:|---:|---:|---|")
    totals = collections.defaultdict(float)
    rng = np.random.default_rng(0)
    for (net, b, h, w, c, k), count in sorted(shapes.items()):
        x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, c, k)) / np.sqrt(9 * c), jnp.float32)
        inputs = {"direct": (x, kernel), "winograd": (x, winograd.transform_kernel(kernel))}
        outs = {a: np.asarray(fns[a](*inputs[a])) for a in fns}
        ms = {a: t * 1e3 for a, t in _alternate(fns, inputs, args.repeats).items()}
        xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        k64 = np.asarray(kernel, np.float64)
        exact = sum(xp[:, i : i + h, j : j + w] @ k64[i, j] for i in range(3) for j in range(3))
        err = {a: np.abs(outs[a] - exact).max() / np.abs(exact).max() for a in outs}
        wide = min(c, k) >= WINOGRAD_MIN_CHANNELS
        totals[net, "direct"] += count * ms["direct"]
        totals[net, "wide layers Winograd"] += count * (ms["winograd"] if wide else ms["direct"])
        print(f"| {net} | ({b}, {h}, {w}, {c}) -> {k} | {count} | {ms['direct']:.1f} | {ms['winograd']:.1f} | "
              f"{ms['direct'] / ms['winograd']:.2f}{'' if wide else ', kept direct'} | {err['direct']:.1e}, {err['winograd']:.1e} |",
              flush=True)
    for net in sorted({net for net, _ in totals}):
        print(f"# {net}, count-weighted: direct {totals[net, 'direct']:.0f} ms; layers with >= {WINOGRAD_MIN_CHANNELS} "
              f"channels as Winograd {totals[net, 'wide layers Winograd']:.0f} ms"
              + (" (the extractor prepares only the detector)" if net != "YOLOX-L" else ""))
    if args.network_repeats:
        _whole_detector(args, rng)


def _alternate(fns: dict, inputs: dict, repeats: int) -> dict:
    """Median seconds per call of each function, calls alternating (after one compiling call each)."""
    import jax

    for name, fn in fns.items():
        jax.block_until_ready(fn(*inputs[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs[name]))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _whole_detector(args, rng) -> None:
    import jax.numpy as jnp
    from flax import nnx

    from anim_jax.pose import compile_options
    from anim_jax.pose.yolox import YOLOX, YOLOXConfig

    detector = YOLOX(YOLOXConfig.yolox_l(), rngs=nnx.Rngs(0))
    images = jnp.asarray(rng.uniform(0, 255, (args.batch, 640, 640, 3)), jnp.float32)
    prepared = compile_options.prepare(detector, "cpu")
    fns, inputs = {}, {}
    for name, model in (("direct", detector), ("prepared", prepared)):
        graph, state = nnx.split(model)
        fns[name] = compile_options.jit(lambda s, x, graph=graph: nnx.merge(graph, s)(x), "cpu")
        inputs[name] = (state, images)
    sec = _alternate(fns, inputs, args.network_repeats)
    print(f"# whole YOLOX-L, batch {args.batch}, median of {args.network_repeats}: direct {sec['direct'] * 1e3:.0f} ms, "
          f"prepared ({compile_options.winograd_layers(prepared)} Winograd layers) "
          f"{sec['prepared'] * 1e3:.0f} ms, speed-up {sec['direct'] / sec['prepared']:.2f}")


if __name__ == "__main__":
    main()
