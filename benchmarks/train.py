"""Training throughput: step time, examples/s and MFU of the stage-1 and stage-2 train steps.

    python benchmarks/train.py                          # tiny models (configs/tiny.py), CPU-sized
    python benchmarks/train.py --full                   # SD1.5 sizes, bf16: stage 1 768x768 batch 4/device,
                                                        # stage 2 512x512x24 batch 1/device with remat
    python benchmarks/train.py --full --stage 2 --config.model.remat=dots --config.model.attention=cudnn
    python benchmarks/train.py --config anim_jax/recipes/demo.py:stage1   # the demo's recipe (issue 15)
    python benchmarks/train.py --stage 1 --compiler-option xla_backend_optimization_level=0   # compile time

Random weights (``init_model`` without ``init.weights_dir``) and one random uint8 batch kept on the
device, so the numbers are the train step alone (the data pipeline has its own benchmark,
benchmarks/data.py). Each stage: build + shard the state, compile, 2 warm-up steps, then ``--steps``
timed steps (median reported), each waited for with ``block_until_ready``.

FLOPs per step, three counts (all for the whole global batch):

* ``model`` (the MFU numerator): XLA's cost analysis of the lowered step without remat and with plain
  XLA attention (the same maths as the fused kernels, whose work XLA cannot see), i.e. what
  autodiff emits: forward + backward of trained modules, forward only of frozen ones (no backward is
  built for them), plus the activation gradients that flow through frozen layers to reach trained
  ones (stage 2: back through the whole denoiser to its motion modules). Rematerialised recomputation
  is not counted.
* ``hardware``: XLA's cost analysis of the compiled step that runs (per-device partition x devices),
  remat recomputation included (HFU numerator). Attention that runs as a cuDNN custom call or as
  chunks in a loop is under-counted here (a custom call counts nothing, a loop body once).
* ``convention``: 3 x forward(trained modules) + 1 x forward(frozen modules), each module's forward
  counted alone by XLA (stage 2: the motion modules are "denoiser with motion - denoiser without").
  This is the issue's counting rule; for stage 2 it leaves out the backward through the frozen
  denoiser, so it is lower than ``model``.

MFU = FLOPs / (step time x peak x devices). The peak is the device's dense bf16 peak
(``train.metrics.PEAK_BF16_FLOPS``); on a CPU, which has none, the script measures its float32
matmul throughput and reports MFU against that ("vs matmul").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from _hardware import cpu_name  # noqa: E402  (benchmarks run as scripts: their folder is on sys.path)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measured_matmul_peak(dtype) -> float:
    """FLOP/s of a large matmul on one device: the practical peak of a device without a data sheet."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def forward_flops(cfg, trainer) -> dict[str, float]:
    """XLA cost analysis of each module's forward alone, at this step's shapes (abstract weights)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from anim_jax.train.architecture import build_model
    from anim_jax.train.flops import flops_config

    stage = int(cfg.stage)
    cfg = flops_config(cfg)  # plain XLA attention: fused/chunked kernels hide their FLOPs from XLA
    model = build_model(cfg, abstract=True)
    graphdef, state = nnx.split(model)
    spec = trainer.batch_spec
    b, f = spec["frames"].shape[:2]
    h, w = spec["reference"].shape[1:3]
    sds = jax.ShapeDtypeStruct

    def flops(fn, *args):
        ca = jax.jit(fn).lower(state, *args).cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"])

    m = lambda s: nnx.merge(graphdef, s)
    images = sds((b * f + b, h, w, 3), jnp.float32)
    out = {"vae_encode": flops(lambda s, x: m(s).encode(x, jax.random.key(0)), images)}
    clip_size = spec["clip"].shape[1]
    out["image_encoder"] = flops(lambda s, x: m(s).image_context(x), sds((b, clip_size, clip_size, 3), jnp.uint8))
    latent = jax.eval_shape(lambda s, x: m(s).encode(x), state, sds((b, h, w, 3), jnp.float32))
    ctx = sds((b, 1, int(model.denoiser.config.cross_attention_dim)), jnp.float32)
    t = sds((b,), jnp.int32)
    out["reference_net"] = flops(lambda s, x, c: m(s).reference_net(x, jnp.zeros((b,), jnp.int32), c), latent, ctx)
    tokens = jax.eval_shape(lambda s, x, c: m(s).reference_net(x, jnp.zeros((b,), jnp.int32), c), state, latent, ctx)
    poses = sds((b, f, h, w, 3), jnp.float32)
    out["pose_guider"] = flops(lambda s, p: m(s).pose_features(p), poses)
    pose_feats = jax.eval_shape(lambda s, p: m(s).pose_features(p), state, poses)
    noisy = sds((b, f) + latent.shape[1:], jnp.float32)

    def denoise(s, x, t, c, toks, pf):
        mm = m(s)
        return mm.predict(x, t, c, reference=mm.denoiser.reference_kv(toks), pose_features=pf)

    out["denoiser"] = flops(denoise, noisy, t, ctx, tokens, pose_feats)
    if stage == 2:
        from ml_collections import ConfigDict

        cfg1 = ConfigDict(cfg.to_dict())
        cfg1.model.motion = None  # the same denoiser without motion modules
        flat = build_model(cfg1, abstract=True)
        g1, s1 = nnx.split(flat)

        def denoise_2d(s, x, t, c, toks, pf):
            mm = nnx.merge(g1, s)
            return mm.predict(x, t, c, reference=mm.denoiser.reference_kv(toks), pose_features=pf)

        ca = jax.jit(denoise_2d).lower(s1, noisy, t, ctx, tokens, pose_feats).cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["motion_modules"] = out["denoiser"] - float(ca["flops"])
        out["denoiser"] = float(ca["flops"])  # the 2-D part
    return out


def convention_flops(stage: int, fwd: dict[str, float]) -> float:
    if stage == 1:
        trained = fwd["reference_net"] + fwd["denoiser"] + fwd["pose_guider"]
        frozen = fwd["vae_encode"] + fwd["image_encoder"]
    else:
        trained = fwd["motion_modules"]
        frozen = fwd["denoiser"] + fwd["reference_net"] + fwd["pose_guider"] + fwd["vae_encode"] + fwd["image_encoder"]
    return 3 * trained + frozen


def count_stage(spec: str, overrides: list[str]) -> dict:
    """FLOP counts only, from an abstract state (nothing allocated or compiled): any size on any host."""
    from anim_jax import configlib
    from anim_jax.train.flops import flops_config, step_flops
    from anim_jax.train.setup import setup

    cfg = configlib.load_config(spec, overrides)
    t0 = time.perf_counter()
    trainer = setup(flops_config(cfg), abstract=True)
    model = step_flops(trainer)
    fwd = forward_flops(cfg, trainer)
    gbs = trainer.global_batch_size
    return dict(stage=int(cfg.stage), config=spec, overrides=overrides, global_batch=gbs, devices=trainer.mesh.devices.size,
                resolution=list(cfg.data.resolution), frames=int(cfg.data.n_frames) if int(cfg.stage) == 2 else 1,
                model_flops=model, convention_flops=convention_flops(int(cfg.stage), fwd), forward_flops=fwd,
                seconds=time.perf_counter() - t0)


def _stage_flops(stage: int, cfg, trainer, counts: dict | None) -> tuple[float | None, float | None]:
    """(model, convention) FLOPs of a step: from ``counts`` (a ``--count-only --json`` file made on a
    CPU host) when given, else XLA's cost analysis here. Some backends (GPU, for lowered programs)
    give none; then both are None and MFU is reported as unknown rather than guessed."""
    if counts is not None:
        c = counts.get(stage)
        if c is None:
            raise SystemExit(f"--counts file has no stage-{stage} line")
        if c["global_batch"] != trainer.global_batch_size:
            raise SystemExit(f"--counts stage {stage}: global batch {c['global_batch']} != this run's "
                             f"{trainer.global_batch_size}; count with the same config and device count")
        return c["model_flops"], c["convention_flops"]
    model = aa_step_flops(trainer, cfg)
    try:
        conv = convention_flops(stage, forward_flops(cfg, trainer))
    except (TypeError, KeyError, NotImplementedError):  # no cost analysis on this backend
        conv = None
    return model, conv


def aa_step_flops(trainer, cfg):
    from anim_jax.train.flops import step_flops

    return step_flops(trainer, cfg)


def bench_stage(spec: str, overrides: list[str], steps: int, counts: dict | None = None,
                compiler_options: dict[str, str] | None = None) -> dict:
    import jax
    import numpy as np

    from anim_jax import configlib
    from anim_jax.train import metrics as metrics_lib
    from anim_jax.train.flops import compiled_flops
    from anim_jax.train.setup import setup

    cfg = configlib.load_config(spec, overrides)
    stage = int(cfg.stage)
    t0 = time.perf_counter()
    trainer = setup(cfg)
    setup_s = time.perf_counter() - t0
    n_dev = trainer.mesh.devices.size
    rng = np.random.default_rng(0)
    batch = trainer.put_batch({k: rng.integers(0, 256, v.shape).astype(np.uint8) for k, v in trainer.batch_spec.items()})

    t0 = time.perf_counter()
    compiled = trainer.lower().compile(compiler_options=compiler_options or None)
    compile_s = time.perf_counter() - t0
    hw_per_device = compiled_flops(compiled)

    state = trainer.state
    for _ in range(2):
        state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state.step, m))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    print(f"# stage {stage}: setup {setup_s:.1f} s, compile {compile_s:.1f} s, median step {step_s:.4f} s", flush=True)
    model_flops, conv = _stage_flops(stage, cfg, trainer, counts)

    peak = metrics_lib.peak_flops_per_device()
    peak_kind = "bf16 data sheet"
    if peak is None:
        import jax.numpy as jnp

        peak = measured_matmul_peak(jnp.dtype(cfg.model.compute_dtype))
        peak_kind = f"measured {cfg.model.compute_dtype} matmul"
    mem = None
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        mem = stats["peak_bytes_in_use"] / 2**30
    gbs = trainer.global_batch_size
    frames = gbs * (int(cfg.data.n_frames) if stage == 2 else 1)
    mfu = lambda fl: fl / (step_s * peak * n_dev) if fl else float("nan")
    return dict(
        stage=stage, config=spec, overrides=overrides, devices=n_dev, device_kind=jax.devices()[0].device_kind,
        global_batch=gbs, frames_per_step=frames, resolution=list(cfg.data.resolution), compute_dtype=cfg.model.compute_dtype,
        remat=cfg.model.remat, attention=cfg.model.attention, compiler_options=compiler_options or {}, setup_s=setup_s, compile_s=compile_s, step_s=step_s,
        step_s_min=float(np.min(times)), examples_per_s=gbs / step_s, frames_per_s=frames / step_s,
        model_flops=model_flops, hardware_flops=(hw_per_device or 0.0) * n_dev, convention_flops=conv,
        peak_flops_per_device=peak, peak_kind=peak_kind, mfu=mfu(model_flops), hfu=mfu((hw_per_device or 0) * n_dev),
        mfu_convention=mfu(conv), flops_source="counts file" if counts else "cost analysis here", peak_memory_gib=mem, loss=float(m["loss"]),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="SD1.5 sizes in bf16 (configs/stage{1,2}.py) instead of tiny")
    p.add_argument("--stage", choices=("1", "2", "both"), default="both")
    p.add_argument("--steps", type=int, default=10, help="timed steps per stage (median reported)")
    p.add_argument("--json", help="also append the results as JSON lines to this file")
    p.add_argument("--counts", help="take the FLOPs per step from this --count-only --json file (made on a CPU "
                   "host: GPU backends give no cost analysis of a lowered program)")
    p.add_argument("--count-only", action="store_true",
                   help="only count FLOPs (abstract state, nothing allocated or compiled): --full on a CPU host")
    p.add_argument("--config", help="benchmark this config file (PATH[:ARG], e.g. anim_jax/recipes/demo.py:stage1) "
                   "instead of configs/stage{1,2}.py; its own stage only")
    p.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA option for compiling the step (e.g. xla_backend_optimization_level=0); repeatable")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {bad}")
    from anim_jax.train.setup import xla_options

    try:  # the trainer's own parser of train.xla_options
        compiler_options = xla_options(",".join(args.compiler_option))
    except ValueError:
        p.error(f"--compiler-option takes KEY=VALUE, got {args.compiler_option}")
    import jax

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stages = (1, 2) if args.stage == "both" else (int(args.stage),)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, host CPU {cpu_name()} ({os.cpu_count()} cores)")
    counts = None
    if args.counts:
        with open(args.counts) as f:
            counts = {(r := json.loads(line))["stage"]: r for line in f if line.strip()}
    results = []
    specs = []
    for stage in stages:
        spec = os.path.join(here, "configs", f"stage{stage}.py") + ("" if args.full else ":tiny")
        overrides = list(rest)
        if not args.full and stage == 2:
            overrides = ["--config.data.batch_size=2", *overrides]
        specs.append((spec, overrides))
    if args.config:
        specs = [(args.config, list(rest))]
    for spec, overrides in specs:
        r = (count_stage(spec, overrides) if args.count_only
             else bench_stage(spec, overrides, args.steps, counts, compiler_options))
        results.append(r)
        print(json.dumps(r))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print()
    if args.count_only:
        print("| stage | size | global batch | model TFLOP/step | 3x trained + 1x frozen TFLOP/step | forward TFLOP by module |")
        print("|---|---|---|---|---|---|")
        for r in results:
            res = "x".join(str(x) for x in r["resolution"]) + (f"x{r['frames']}" if r["stage"] == 2 else "")
            fwd = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in r["forward_flops"].items())
            print(f"| {r['stage']} | {res} | {r['global_batch']} | {r['model_flops'] / 1e12:.3f} "
                  f"| {r['convention_flops'] / 1e12:.3f} | {fwd} |")
        return 0
    print("| stage | size | devices | global batch | compute | remat | compile (s) | step (s) | examples/s | frames/s "
          "| model TFLOP/step | MFU | HFU | MFU (3x trained + frozen) | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        res = "x".join(str(x) for x in r["resolution"]) + (f"x{r['frames_per_step'] // r['global_batch']}" if r["stage"] == 2 else "")
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        print(f"| {r['stage']} | {res} | {r['devices']} | {r['global_batch']} | {r['compute_dtype']} | {r['remat']} "
              f"| {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['examples_per_s']:.2f} | {r['frames_per_s']:.2f} | {(r['model_flops'] or float('nan')) / 1e12:.4f} "
              f"| {r['mfu']:.1%} | {r['hfu']:.1%} | {r['mfu_convention']:.1%} | {mem} |")
    print(f"\npeak per device: {results[0]['peak_flops_per_device']:.3g} FLOP/s ({results[0]['peak_kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
