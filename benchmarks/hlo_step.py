"""Byte traffic of one denoising step, read from XLA's optimised HLO (CPU compile, shapes only).

    python benchmarks/hlo_step.py --full --out step.hlo.txt      # SD1.5 + AnimateDiff v2, 512x768, 24 frames, bf16
    python benchmarks/hlo_step.py                                 # the reduced size of benchmarks/animate.py

The step is what the sampling loop runs per timestep: the conditional branch (reference keys/values
precomputed) and the unconditional one over every context window, as ``benchmarks/animate.py``
counts it. Nothing is allocated: the parameters and inputs are abstract shapes and the program is
compiled for the CPU, whose fusion decisions differ from the GPU's in detail but not in what has to
be materialised between fusions (convolutions, dots, reductions across the layout).

Reported: every buffer the compiled program writes outside a fusion, grouped by what produces it
(dot, convolution, a fusion named after its root, copy/transpose, ...), with its count and total
bytes; the float32 buffers as large as an activation (a GroupNorm's float32 upcast written out
instead of fused would show up there); and the transposes and copies by shape, which is where
layout changes around the temporal attention would appear.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anim_jax.diffusion.windows import windows_array  # noqa: E402
from anim_jax.models.attention_ops import AttentionConfig  # noqa: E402
from anim_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from benchmarks.animate import reference_token_shapes, sizes  # noqa: E402

BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\](?:\{[^}]*\})? (\w[\w-]*)\(")


def lower_step(full: bool, width: int, height: int, frames: int, dtype, attention: AttentionConfig):
    size = sizes(full)
    unet = UNetConfig(**size["unet"], motion=size["motion"])
    den = nnx.eval_shape(lambda: UNet2DConditionModel(unet, dtype=dtype, param_dtype=dtype, attention=attention,
                                                      rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(den)
    h, w = height // 8, width // 8
    windows = windows_array(frames)
    flat = jnp.asarray(windows.reshape(-1))
    tokens = reference_token_shapes(den, h, w, dtype)
    kv = jax.eval_shape(lambda st, t: nnx.merge(graphdef, st).reference_kv(t), state, tokens)
    c0 = size["unet"]["block_out_channels"][0]

    def one_step(state, x, pf, ctx, kv):
        d = nnx.merge(graphdef, state)
        xw, pw = x[flat], pf[flat]
        c = d(xw, 999, ctx, num_frames=windows.shape[1], reference=kv, pose_features=pw)
        u = d(xw, 999, jnp.zeros_like(ctx), num_frames=windows.shape[1], reference=None, pose_features=pw)
        return c, u

    args = (state, jax.ShapeDtypeStruct((frames, h, w, 4), jnp.float32),
            jax.ShapeDtypeStruct((frames, h, w, c0), dtype),
            jax.ShapeDtypeStruct((1, 1, unet.cross_attention_dim), dtype), kv)
    return jax.jit(one_step).trace(*args).lower(lowering_platforms=("cpu",))


def _fusion_roots(text: str) -> dict[str, str]:
    """fused computation name -> opcode of its ROOT."""
    roots, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:%)?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            current = m.group(1)
        elif current and line.strip().startswith("ROOT"):
            mi = INSTR.match(line)
            if mi:
                roots[current] = mi.group(4)
    return roots


def analyse(text: str, top: int = 12) -> dict:
    roots = _fusion_roots(text)
    by_kind = collections.Counter()
    count = collections.Counter()
    big_f32 = collections.Counter()
    moves = collections.Counter()
    in_fused = False
    for line in text.splitlines():
        if not line.startswith(" "):
            name = line.split(" ")[0].lstrip("%")
            in_fused = name.startswith("fused") or "fusion" in name.split(".")[0] and "computation" in name
            continue
        if in_fused:
            continue
        m = INSTR.match(line)
        if not m:
            continue
        _, ty, dims, op = m.groups()
        if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        n = math.prod(int(d) for d in dims.split(",")) if dims else 1
        nbytes = n * BYTES.get(ty, 4)
        kind = op
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            kind = f"fusion({roots.get(called.group(1), '?') if called else '?'})"
        by_kind[kind] += nbytes
        count[kind] += 1
        if ty == "f32" and nbytes >= 2**24:
            big_f32[(kind, dims)] += 1
        if op in ("copy", "transpose") or kind in ("fusion(copy)", "fusion(transpose)"):
            moves[(kind, ty, dims)] += 1
    return dict(by_kind=by_kind, count=count, big_f32=big_f32, moves=moves)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="SD1.5 size")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    ap.add_argument("--attention", default="xla", choices=("xla", "chunked", "flash", "auto"))
    ap.add_argument("--out", help="write the optimised HLO text here")
    ap.add_argument("--analyse", metavar="HLO_TXT", help="only analyse this optimised HLO text (e.g. a GPU dump)")
    args = ap.parse_args()
    if args.analyse:
        try:
            text = open(args.analyse).read()
        except OSError as e:
            print(f"error: --analyse {args.analyse}: {e.strerror}", file=sys.stderr)
            return 2
        report(analyse(text))
        return 0
    width = args.width or (512 if args.full else 64)
    height = args.height or (768 if args.full else 64)
    dtype = getattr(jnp, args.dtype or ("bfloat16" if args.full else "float32"))
    t0 = time.perf_counter()
    lowered = lower_step(args.full, width, height, args.frames, dtype, AttentionConfig(args.attention))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    text = compiled.as_text()
    if args.out:
        with open(args.out + ".part", "w") as fh:
            fh.write(text)
        os.replace(args.out + ".part", args.out)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"{'SD1.5' if args.full else 'reduced'} {width}x{height}, {args.frames} frames, {jnp.dtype(dtype).name}, "
          f"attention={args.attention}: lowered in {t1 - t0:.0f} s, compiled for CPU in {t2 - t1:.0f} s")
    if cost:
        print(f"XLA cost analysis: {cost.get('flops', 0) / 1e12:.2f} TFLOP, "
              f"{cost.get('bytes accessed', 0) / 2**30:.1f} GiB accessed")
    report(analyse(text))
    return 0


def report(res: dict) -> None:
    total = sum(res["by_kind"].values())
    print(f"buffers written outside fusions: {total / 2**30:.2f} GiB")
    print("| producer | count | GiB written | share |\n|---|---|---|---|")
    for kind, b in res["by_kind"].most_common(14):
        print(f"| {kind} | {res['count'][kind]} | {b / 2**30:.2f} | {100 * b / total:.1f}% |")
    print("\nfloat32 buffers of >= 16 MiB (producer, shape: count):")
    for (kind, dims), c in res["big_f32"].most_common(12):
        print(f"  {kind} f32[{dims}]: {c}")
    print("\ncopies/transposes (producer, dtype, shape: count):")
    for (kind, ty, dims), c in res["moves"].most_common(12):
        print(f"  {kind} {ty}[{dims}]: {c}")


if __name__ == "__main__":
    sys.exit(main())
