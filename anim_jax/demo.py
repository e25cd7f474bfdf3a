"""``anim-jax demo``: train a tiny Animate Anyone on synthetic data on a CPU, animate unseen characters.

Everything runs offline, from nothing:

1. a synthetic training set (``OUT/data``) and held-out videos whose characters *and* motions come
   from another seed, so neither appearance nor pose sequence was seen in training;
2. stage 1 then stage 2 with the real trainer (``anim_jax.train.run.train``, anim_jax/recipes/demo.py: the
   tiny architecture with an exact pixel-unshuffle autoencoder instead of the SD VAE), stage 2
   initialised from the stage-1 export;
3. the held-out characters animated with the held-out poses by the real ``AnimatePipeline`` loaded
   from the stage-2 export, by the same architecture untrained (its random initialisation), and by
   the "copy the reference frame" baseline;
4. ``OUT/videos/heldout_<i>.{mp4,gif}`` (reference | pose | generated | ground truth),
   ``OUT/metrics.{md,json}`` (PSNR / SSIM / L1 from ``anim_jax.evaluate``) and ``OUT/loss.png``
   (the training losses read back from the runs' ``logs/metrics.jsonl``).

The reference frame is the held-out video's first frame; the poses and the ground truth are the
frames after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Callable

import numpy as np

from anim_jax import atomic


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo does besides the training configs (anim_jax/recipes/demo.py)."""

    quick: bool = False
    seed: int = 0
    train_videos: int = 64
    train_frames: int = 24  # frames per training video
    heldout_videos: int = 4
    heldout_frames: int = 8  # generated frames per held-out video
    heldout_seed_offset: int = 1_000_003  # held-out videos: another seed, so new characters and motions
    steps: int = 4  # DDIM steps
    guidance_scale: float = 1.0
    fps: float = 8.0

    @classmethod
    def for_run(cls, quick: bool, seed: int) -> "DemoSettings":
        return cls(quick=quick, seed=seed)


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny model on synthetic data on this machine and animate unseen characters (no downloads)",
        description=(
            "End to end on a CPU in a few minutes, offline and without pretrained weights: synthetic data, "
            "stage-1 and stage-2 training with the real trainer, animation of held-out characters with held-out "
            "poses by the real pipeline, and PSNR/SSIM/L1 against the untrained model and a copy-the-reference "
            "baseline. Writes videos, metrics.md/json and loss.png to --out."
        ),
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a shorter run (fewer videos and steps), as the test suite's")
    p.add_argument("--seed", type=int, default=0, help="seed of the training data and the models (default: 0)")
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    import logging

    # The trainer logs at INFO; the demo prints its own progress, so keep only warnings from libraries.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from anim_jax import storage

    if storage.is_url(args.out):
        # A local showcase: a few CPU minutes whose videos and plot are opened on this machine.
        print(f"anim-jax demo: error: --out {args.out!r}: the demo writes a local folder; give a local path "
              "(and copy the folder to a bucket afterwards if it should live there)", file=sys.stderr)
        return 2
    result = run(args.out, DemoSettings.for_run(args.quick, args.seed))
    print(summary(result))
    return 0


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(out, settings: DemoSettings = DemoSettings(), *, say: Callable[[str], None] | None = None) -> dict:
    """The whole demo into ``out``; returns ``{"metrics": ..., "paths": ..., "seconds": ...}``."""
    say = say or (lambda msg: print(f"[demo] {msg}", flush=True))
    out = pathlib.Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    for own in ("data", "runs", "videos"):  # the demo's own folders: a rerun starts from scratch
        shutil.rmtree(out / own, ignore_errors=True)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    from anim_jax.recipes import demo as demo_config

    height, width = demo_config.RESOLUTION
    t0 = time.perf_counter()
    say(f"1/5 writing {settings.train_videos} synthetic training videos ({settings.train_frames} frames, {width}x{height}) "
        f"to {out / 'data'}")
    from data_pipelines.synthetic import write_synthetic_dataset

    write_synthetic_dataset(out / "data", settings.train_videos, seed=settings.seed, num_frames=settings.train_frames,
                            height=height, width=width, backgrounds=demo_config.BACKGROUNDS)
    heldout = heldout_videos(settings, height, width)
    seconds["data"] = time.perf_counter() - t0

    runs = out / "runs"
    stage1, stage2 = stage_configs(settings, out / "data", runs / "stage1" / "export")
    t0 = time.perf_counter()
    say(f"2/5 stage 1: training denoiser + ReferenceNet + PoseGuider on single frames, {stage1.train.num_steps} steps "
        f"(batch {stage1.data.batch_size}; the first step compiles, ~1 min)")
    _train(stage1, runs / "stage1")
    seconds["stage1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"3/5 stage 2: training the motion modules on {stage2.data.n_frames}-frame clips, {stage2.train.num_steps} "
        f"steps, from the stage-1 export")
    _train(stage2, runs / "stage2")
    seconds["stage2"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"4/5 animating {len(heldout)} held-out characters with held-out poses ({settings.steps} DDIM steps, "
        f"guidance {settings.guidance_scale}): trained model, untrained model, copy-the-reference")
    results = evaluate(runs / "stage2" / "export", stage2, heldout, settings)
    seconds["animate"] = time.perf_counter() - t0

    say("5/5 writing videos, metrics and the loss plot")
    paths = write_outputs(out, results, heldout, settings, stage1_logs=runs / "stage1" / "logs",
                          stage2_logs=runs / "stage2" / "logs", seconds=seconds)
    seconds["total"] = time.perf_counter() - t_start
    return {"metrics": results["metrics"], "paths": paths, "seconds": seconds, "out": str(out)}


def stage_configs(settings: DemoSettings, dataset, stage1_export):
    """The two training configs (anim_jax/recipes/demo.py) for this run."""
    from anim_jax.recipes import demo as demo_config

    suffix = ",quick" if settings.quick else ""
    stage1 = demo_config.get_config("stage1" + suffix)
    stage2 = demo_config.get_config("stage2" + suffix)
    for c in (stage1, stage2):
        c.data.dataset = str(dataset)
        c.seed = int(settings.seed)
        c.data.seed = int(settings.seed)
        c.mesh.num_devices = 1  # one device: a CPU runs the tiny model fastest unsharded
    stage2.init.weights_dir = str(stage1_export)
    return stage1, stage2


def _train(cfg, workdir: pathlib.Path) -> None:
    from anim_jax.train.run import train
    from anim_jax.train.loop import STATUS_COMPLETED

    result = train(cfg, workdir)
    if result.status != STATUS_COMPLETED:
        raise RuntimeError(f"training in {workdir} stopped early: {result.status} at step {result.step}")


# --------------------------------------------------------------------------------------------
# Held-out data and evaluation
# --------------------------------------------------------------------------------------------


def heldout_videos(settings: DemoSettings, height: int, width: int) -> list[dict]:
    """Held-out videos: ``reference`` (H, W, 3), ``poses`` and ``frames`` (F, H, W, 3), uint8."""
    from anim_jax.recipes import demo as demo_config
    from data_pipelines.synthetic import render_video

    out = []
    for i in range(settings.heldout_videos):
        frames, poses, _ = render_video(settings.seed + settings.heldout_seed_offset, i,
                                        num_frames=settings.heldout_frames + 1, height=height, width=width,
                                        backgrounds=demo_config.BACKGROUNDS)
        out.append(dict(reference=frames[0], poses=poses[1:], frames=frames[1:]))
    return out


def untrained_weights(cfg) -> dict:
    """The stage-2 architecture with the random initialisation training starts from (same seed;
    zero-initialised PoseGuider ``conv_out`` and motion ``proj_out`` stay as constructed): the
    parameter state of each component."""
    from flax import nnx

    from anim_jax.train.architecture import build_model

    init = cfg.copy_and_resolve_references()
    init.init.weights_dir = ""
    model = build_model(init)
    return {name: nnx.state(module) for name, module in model.components().items()}


def evaluate(export_dir, cfg, heldout: list[dict], settings: DemoSettings) -> dict:
    """Animates every held-out video with the trained model, the untrained one and copy-the-reference;
    their per-video and mean metrics (``anim_jax.evaluate``) and the generated frames.

    Both models run in one ``AnimatePipeline`` (loaded from the export; the untrained weights are
    swapped in afterwards), so its jitted stages compile once."""
    from flax import nnx

    from anim_jax.evaluate import mean_metrics, video_metrics
    from anim_jax.pipeline import AnimatePipeline

    pipe = AnimatePipeline.from_pretrained(export_dir)
    untrained = untrained_weights(cfg)
    h, w = heldout[0]["reference"].shape[:2]
    generated: dict[str, list[np.ndarray]] = {"trained": [], "untrained": [], "copy_reference": []}
    for name in ("trained", "untrained"):
        if name == "untrained":
            for component, state in untrained.items():
                nnx.update(getattr(pipe, component), state)
        for i, video in enumerate(heldout):
            n = len(video["poses"])
            result = pipe(video["reference"], list(video["poses"]), width=w, height=h, num_frames=n,
                          steps=settings.steps, guidance_scale=settings.guidance_scale, seed=settings.seed + i,
                          context_frames=n, context_overlap=0)
            generated[name].append(result.frames)
    for video in heldout:
        generated["copy_reference"].append(np.repeat(video["reference"][None], len(video["poses"]), axis=0))
    per_video = {name: [video_metrics(g, v["frames"]) for g, v in zip(gens, heldout)] for name, gens in generated.items()}
    metrics = {name: dict(mean=mean_metrics(m), per_video=[x.as_dict() for x in m]) for name, m in per_video.items()}
    return {"metrics": metrics, "generated": generated}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

METHODS = (("trained", "trained model"), ("untrained", "untrained model (same architecture, random init)"),
           ("copy_reference", "copy the reference frame"))


def write_outputs(out: pathlib.Path, results: dict, heldout: list[dict], settings: DemoSettings, *, stage1_logs,
                  stage2_logs, seconds: dict) -> dict:
    from anim_jax import media
    paths: dict[str, list[str] | str] = {"mp4": [], "gif": []}
    for i, (video, gen) in enumerate(zip(heldout, results["generated"]["trained"])):
        grid = media.side_by_side([video["reference"], video["poses"], gen, video["frames"]])
        zoom = max(1, 128 // video["reference"].shape[0])  # tiny frames are hard to see on screen
        grid = np.repeat(np.repeat(grid, zoom, axis=1), zoom, axis=2)
        mp4, gif = out / "videos" / f"heldout_{i}.mp4", out / "videos" / f"heldout_{i}.gif"
        media.write_mp4(mp4, grid, fps=settings.fps)
        media.write_gif(gif, grid, fps=settings.fps)
        paths["mp4"].append(str(mp4))
        paths["gif"].append(str(gif))

    from anim_jax.train.metrics import scalar_series

    losses = {"stage 1": scalar_series(stage1_logs, "loss"), "stage 2": scalar_series(stage2_logs, "loss")}
    plot = out / "loss.png"
    plot_losses(plot, losses)
    paths["loss_plot"] = str(plot)

    metrics = results["metrics"]
    record = dict(
        settings=dataclasses.asdict(settings),
        methods={k: label for k, label in METHODS},
        metrics=metrics,
        losses={k: [[s, v] for s, v in pts] for k, pts in losses.items()},
        seconds=seconds,
        trained_beats_baselines=bool(metrics["trained"]["mean"]["psnr"] > max(
            metrics["untrained"]["mean"]["psnr"], metrics["copy_reference"]["mean"]["psnr"])),
    )
    atomic.write_text(out / "metrics.json", json.dumps(record, indent=2))
    atomic.write_text(out / "metrics.md", metrics_table(metrics, settings))
    paths["metrics_md"] = str(out / "metrics.md")
    paths["metrics_json"] = str(out / "metrics.json")
    return paths


def metrics_table(metrics: dict, settings: DemoSettings) -> str:
    n = metrics["trained"]["mean"]["videos"]
    from anim_jax.recipes.demo import RESOLUTION

    lines = [
        f"# anim-jax demo: {n} held-out synthetic videos x {settings.heldout_frames} frames, "
        f"{RESOLUTION[1]}x{RESOLUTION[0]}",
        "",
        "Unseen characters animated with unseen pose sequences; per-frame metrics against the ground truth, "
        "averaged per video then over videos (PSNR/SSIM in float on [0, 1], L1 on [0, 1]).",
        f"Sampling: {settings.steps} DDIM steps, guidance scale {settings.guidance_scale}.",
        "",
        "| method | PSNR (dB) ↑ | SSIM ↑ | L1 ↓ |",
        "|---|---:|---:|---:|",
    ]
    for key, label in METHODS:
        m = metrics[key]["mean"]
        lines.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['l1']:.4f} |")
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    m = result["metrics"]
    p = result["paths"]
    s = result["seconds"]
    psnr = {k: m[k]["mean"]["psnr"] for k, _ in METHODS}
    verdict = ("the trained model beats both baselines" if psnr["trained"] > max(psnr["untrained"], psnr["copy_reference"])
               else "the trained model does NOT beat both baselines")
    lines = [
        "",
        f"anim-jax demo finished in {s['total']:.0f} s (data {s['data']:.0f} s, stage 1 {s['stage1']:.0f} s, "
        f"stage 2 {s['stage2']:.0f} s, animation {s['animate']:.0f} s)",
        f"held-out PSNR: trained {psnr['trained']:.2f} dB, untrained {psnr['untrained']:.2f} dB, "
        f"copy-the-reference {psnr['copy_reference']:.2f} dB: {verdict}",
        f"  metrics:   {p['metrics_md']}  ({p['metrics_json']})",
        f"  loss plot: {p['loss_plot']}",
        f"  videos:    {pathlib.Path(p['mp4'][0]).parent}/heldout_*.mp4 / .gif  (reference | pose | generated | ground truth)",
        f"  weights:   {result['out']}/runs/stage2/export  (anim-jax animate --weights ...)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The loss plot (from the runs' metrics.jsonl)
# --------------------------------------------------------------------------------------------


def plot_losses(path, series: dict[str, list[tuple[int, float]]], width: int = 900, height: int = 360) -> None:
    """One panel per series: the per-step loss (light) and its running mean (dark), drawn with PIL."""
    from PIL import Image, ImageDraw

    names = [k for k, v in series.items() if v]
    if not names:
        raise ValueError("no training losses were logged")
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    panel_w = width // len(names)
    left, right, top, bottom = 58, 14, 30, 36
    for k, name in enumerate(names):
        pts = series[name]
        steps = np.array([s for s, _ in pts], np.float64)
        vals = np.array([v for _, v in pts], np.float64)
        x0, x1 = k * panel_w + left, (k + 1) * panel_w - right
        y0, y1 = top, height - bottom
        lo, hi = 0.0, float(np.percentile(vals, 99)) * 1.05 or 1.0
        smin, smax = float(steps.min()), float(max(steps.max(), steps.min() + 1))
        to_xy = lambda s, v: (x0 + (s - smin) / (smax - smin) * (x1 - x0),
                              y1 - (min(v, hi) - lo) / (hi - lo) * (y1 - y0))
        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        for j in range(5):  # horizontal grid with value labels
            v = lo + (hi - lo) * j / 4
            y = to_xy(smin, v)[1]
            d.line([x0, y, x1, y], fill=(225, 225, 225))
            d.text((x0 - 52, y - 6), f"{v:.3f}", fill=(0, 0, 0))
        d.text((x0, y1 + 6), f"{int(smin)}", fill=(0, 0, 0))
        d.text((x1 - 30, y1 + 6), f"{int(smax)}", fill=(0, 0, 0))
        d.text(((x0 + x1) // 2 - 12, y1 + 18), "step", fill=(0, 0, 0))
        d.text((x0, 8), f"{name}: training loss (min-SNR weighted v-MSE)", fill=(0, 0, 0))
        d.line([to_xy(s, v) for s, v in zip(steps, vals)], fill=(160, 190, 235), width=1)
        window = max(1, len(vals) // 15)
        smooth = np.convolve(vals, np.ones(window) / window, mode="valid")
        d.line([to_xy(s, v) for s, v in zip(steps[window - 1:], smooth)], fill=(20, 60, 170), width=3)
    atomic.write_with(path, lambda tmp: img.save(tmp, format="PNG"))


if __name__ == "__main__":
    from anim_jax.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
