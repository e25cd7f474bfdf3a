"""One attention call at a time: the calls one denoising step of ``moore_side_by_side.py``'s tiny model
makes at a given frame size, timed alone (jitted, median of ``--repeats``).

    python benchmarks/attention.py --size 256 [--one-thread] [--implementation auto]

Rows (24 frames, classifier-free guidance batched: 48 frame rows, half of them with the reference
tokens masked out through ``kv_lengths``):
* ``spatial Lq/Lk``: the denoiser's self-attention with the reference tokens appended, at every UNet
  level with attention (2 heads; head_dim 16 at the top level, 32 below);
* ``temporal N``: the motion module's attention over the 24 frames, heads first
  (``dot_product_attention_heads_first``: N = 2 x positions, 8 heads).
``--one-thread``: XLA:CPU's intra-op threads off (set before jax loads), as the side-by-side's
one-thread rows; pin the process yourself (``taskset -c 0``) to keep it on one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="frame size in pixels, a multiple of 64 (default 256)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--implementation", default="auto", choices=("xla", "chunked", "flash", "auto"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--one-thread", action="store_true")
    args = ap.parse_args(argv)
    if args.size % 64 or args.size <= 0 or args.frames < 1 or args.repeats < 1:
        print("error: --size must be a positive multiple of 64, --frames and --repeats >= 1", file=sys.stderr)
        return 2
    if args.one_thread:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from anim_jax.models.attention_ops import AttentionConfig, dot_product_attention, dot_product_attention_heads_first

    config = AttentionConfig(args.implementation)
    rng = np.random.default_rng(0)
    rows = 2 * args.frames
    side = args.size // 8  # latent side
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731

    def median_ms(fn, *xs) -> float:
        jax.block_until_ready(fn(*xs))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times.append(time.perf_counter() - t0)
        return 1000 * sorted(times)[len(times) // 2]

    spatial = jax.jit(lambda q, k, v, lengths: dot_product_attention(q, k, v, config, kv_lengths=lengths))
    temporal = jax.jit(lambda q, k, v: dot_product_attention_heads_first(q, k, v, config))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, attention={args.implementation}, "
          f"{'one thread' if args.one_thread else 'XLA threads'}; median of {args.repeats}, ms per call")
    print("| call | shape (q) | keys | ms |")
    print("|---|---|---|---:|")
    for level, head_dim in ((1, 16), (2, 32), (4, 32)):
        lq = (side // level) ** 2
        q = normal(rows, lq, 2, head_dim)
        k = normal(rows, 2 * lq, 2, head_dim)
        lengths = jnp.asarray([lq] * args.frames + [2 * lq] * args.frames, jnp.int32)
        print(f"| spatial {lq}/{2 * lq} | {tuple(q.shape)} | own + reference (uncond. half: own) | "
              f"{median_ms(spatial, q, k, k, lengths):.1f} |", flush=True)
    for level, head_dim in ((1, 4), (2, 8), (4, 8)):
        n = 2 * (side // level) ** 2
        q = normal(n, 8, args.frames, head_dim)
        print(f"| temporal {n} | {tuple(q.shape)} | {args.frames} frames | {median_ms(temporal, q, q, q):.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
