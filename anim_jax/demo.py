"""``anim-jax demo``: a small Animate Anyone, shipped with the package, animating characters it never saw.

By default the demo uses the weights in ``anim_jax/demo_weights`` (trained by ``anim-jax demo
--train``, recipe ``anim_jax/recipes/demo.py``) and, offline, in a few CPU minutes:

1. renders the held-out set: synthetic characters wearing colour pairs no training video shows
   (``data_pipelines.synthetic`` palette mode), each performing the motion of another held-out
   character (another seed: no training motion); the reference picture is the character in its own
   first pose, the ground truth is the character performing the other motion;
2. animates them with the shipped model, with the same architecture untrained (random
   initialisation), and copies the reference frame (the baseline of doing nothing);
3. animates one held-out motion with four held-out reference characters (the appearance swap);
4. writes a labelled, upscaled grid video per example, the swap video, ``metrics.md``/``.json``
   (PSNR, SSIM, L1 and the per-body-part colour error from the generator's part maps) and prints
   the ``anim-jax animate`` command that reuses the weights.

``--train`` first trains the model from scratch with the project's trainer (stage 1, then stage 2
from the stage-1 export; training records rendered in memory) and uses that instead; ``--train
--quick`` is the test suite's short run (a smaller model at 32x32, a few hundred steps), which
shows learning but not appearance transfer; ``--train-only`` stops after writing the weights.
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
from anim_jax.weights_dir import packaged_demo_weights

HELDOUT_CHARACTER_SEED = 1_000_003  # offsets of the held-out characters' and motions' seeds
HELDOUT_MOTION_SEED = 2_000_003
COLOUR_PARTS = ("skin", "hair", "top", "bottom", "shoes")  # parts scored by the per-part colour error
MIN_PART_PIXELS = 4  # a part smaller than this in a frame is not scored there
GRID_HEIGHT = 192  # panel height of the grid videos (64x64 frames are upscaled 3x)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo animates and how (the training recipe is anim_jax/recipes/demo.py)."""

    quick: bool = False
    seed: int = 0
    variant: str = "full"  # training recipe variant (full | quick), with --train
    heldout_videos: int = 4
    heldout_frames: int = 8  # generated frames per held-out video
    frame_stride: int = 2  # held-out frames are every 2nd frame of the motion: more movement per frame
    steps: int = 8  # DDIM steps
    guidance_scale: float = 1.0
    fps: float = 8.0

    @classmethod
    def for_run(cls, quick: bool, seed: int, variant: str = "full") -> "DemoSettings":
        return cls(quick=quick, seed=seed, variant="quick" if quick else variant)


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="animate unseen synthetic characters with the small model shipped with the package (offline)",
        description=(
            "Animates held-out synthetic characters performing held-out motions with the demo model shipped in "
            "anim_jax/demo_weights, against the same model untrained and copying the reference; writes labelled "
            "grid videos, an appearance-swap video and metrics.md (PSNR, SSIM, L1, per-part colour error) to --out. "
            "--train first reproduces the model from scratch with the project's trainer."
        ),
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="a converted-weights directory to evaluate instead of the shipped demo model")
    p.add_argument("--train", action="store_true",
                   help="train the demo model from scratch (stage 1 then stage 2; the shipped model's recipe, "
                        "about 67 minutes on 2 idle CPU cores) and use it; writes OUT/weights")
    p.add_argument("--quick", action="store_true",
                   help="with --train: the test suite's short run, a smaller model at 32x32 for 40 + 4 steps on 16 "
                        "videos (shows learning, not appearance transfer), and 4-step sampling")
    p.add_argument("--train-only", action="store_true", help="with --train: stop once the weights are written")
    p.add_argument("--weights-out", default=None, metavar="DIR",
                   help="with --train: where to write the trained weights (default: OUT/weights)")
    p.add_argument("--data-workers", type=int, default=0, metavar="N",
                   help="with --train: processes rendering the training videos (default: 0, as many as CPUs, at most 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training data, the models and the noise (default: 0)")
    p.set_defaults(func=run_demo)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_demo(args: argparse.Namespace) -> int:
    import logging

    from anim_jax import storage

    if (args.quick or args.train_only or args.weights_out) and not args.train:
        return _fail("--quick, --train-only and --weights-out only apply with --train")
    if args.train and args.weights:
        return _fail("give either --train (train new weights) or --weights DIR (evaluate those), not both")
    if args.data_workers < 0:
        return _fail(f"--data-workers must be >= 0, got {args.data_workers}")
    weights = None
    if not args.train:
        weights = pathlib.Path(args.weights) if args.weights else packaged_demo_weights()
        if not (weights / "anim_jax.json").is_file():
            hint = "" if args.weights else " (this install has no demo weights: run `anim-jax demo --train`)"
            return _fail(f"{str(weights)!r} is not a converted-weights directory: anim_jax.json is missing{hint}")
    if storage.is_url(args.out):
        try:
            storage.check_bucket(args.out, "--out")
        except (ValueError, FileNotFoundError, PermissionError) as e:
            return _fail(str(e))
    else:
        out = pathlib.Path(args.out)
        if out.exists() and not out.is_dir():
            return _fail(f"--out {str(out)!r} exists and is not a directory")
    # The trainer logs at INFO; the demo prints its own progress, so keep only warnings from libraries.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    settings = DemoSettings.for_run(args.quick, args.seed)
    if args.quick:
        settings = dataclasses.replace(settings, steps=4)
    kwargs = dict(weights=weights, train=args.train, train_only=args.train_only, weights_out=args.weights_out,
                  data_workers=args.data_workers)
    if not storage.is_url(args.out):
        print(summary(run(out, settings, **kwargs)))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="anim-jax-demo-") as tmp:
        text = summary(run(pathlib.Path(tmp), settings, **kwargs))
        print(upload_outputs(pathlib.Path(tmp), args.out, text))
    return 0


def upload_outputs(local: pathlib.Path, url: str, text: str) -> str:
    """A demo folder written at ``local`` moved to ``url`` (an object store has no folder to write
    into as it goes): the paths inside its text files (metrics, the animate command) and in ``text``
    (the summary) are rewritten to the bucket's, and ``metrics.json`` is uploaded last, as the
    commit marker. Returns ``text`` rewritten."""
    from anim_jax import storage

    url = str(url).rstrip("/")
    for path in local.rglob("*"):
        if path.suffix in (".md", ".json", ".txt") and path.is_file():
            path.write_text(path.read_text().replace(str(local), url))
    storage.upload_tree(local, url, last=("metrics.json",))
    return text.replace(str(local), url)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(out, settings: DemoSettings = DemoSettings(), *, weights=None, train: bool = False, train_only: bool = False,
        weights_out=None, data_workers: int = 0, say: Callable[[str], None] | None = None) -> dict:
    """The whole demo into ``out``; returns ``{"metrics", "paths", "seconds", "weights", "out"}``."""
    say = say or (lambda msg: print(f"[demo] {msg}", flush=True))
    out = pathlib.Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    for own in ("runs", "videos", "inputs"):  # the demo's own folders: a rerun starts from scratch
        shutil.rmtree(out / own, ignore_errors=True)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    losses = None
    steps_total = 5 if train else 2  # printed step numbers: training takes the first three
    if train:
        weights, losses = train_model(out, settings, weights_out=weights_out, data_workers=data_workers, say=say,
                                      seconds=seconds)
        if train_only:
            seconds["total"] = time.perf_counter() - t_start
            return {"metrics": None, "paths": {}, "seconds": seconds, "weights": str(weights), "out": str(out)}
    weights = pathlib.Path(weights).absolute()
    from anim_jax import native as native_lib
    from anim_jax import weights_dir

    native = native_lib.from_config(weights_dir.read_config(weights))
    height, width = native.height, native.width
    k = steps_total - 1

    t0 = time.perf_counter()
    say(f"{k}/{steps_total} rendering {settings.heldout_videos} held-out characters (colour pairs never trained on) "
        f"performing held-out motions, {settings.heldout_frames} frames at {width}x{height}; animating them with the "
        f"model in {weights} ({settings.steps} DDIM steps), the same model untrained, and copy-the-reference")
    heldout = heldout_set(settings, height, width)
    swap = swap_set(settings, height, width)
    results = evaluate(weights, heldout, swap, settings, say=say)
    seconds["animate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"{k + 1}/{steps_total} writing grid videos, the appearance-swap video, metrics and the inputs of the "
        f"animate command to {out}")
    paths = write_outputs(out, results, heldout, swap, settings, weights=weights, losses=losses, seconds=seconds)
    seconds["write"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    atomic.write_text(out / "metrics.json", json.dumps(dict(json.loads((out / "metrics.json").read_text()),
                                                            seconds=seconds), indent=2))
    return {"metrics": results["metrics"], "swap": results["swap_matrix"], "paths": paths, "seconds": seconds,
            "weights": str(weights), "out": str(out), "native": dataclasses.asdict(native)}


# --------------------------------------------------------------------------------------------
# Training (--train)
# --------------------------------------------------------------------------------------------


def stage_configs(settings: DemoSettings, stage1_export):
    """The two training configs (anim_jax/recipes/demo.py) for this run."""
    from anim_jax.recipes import demo as recipe

    suffix = "" if settings.variant == "full" else "," + settings.variant
    stage1 = recipe.get_config("stage1" + suffix)
    stage2 = recipe.get_config("stage2" + suffix)
    for c in (stage1, stage2):
        c.data.dataset = ""  # the records are rendered in memory (train(source=...))
        c.seed = int(settings.seed)
        c.data.seed = int(settings.seed)
        c.mesh.num_devices = 1  # one device: the small model runs fastest unsharded
    stage2.init.weights_dir = str(stage1_export)
    return stage1, stage2


def train_model(out: pathlib.Path, settings: DemoSettings, *, weights_out=None, data_workers: int = 0,
                say: Callable[[str], None], seconds: dict) -> tuple[pathlib.Path, dict]:
    """Stage 1 and stage 2 with the real trainer; the stage-2 export in float16 with the demo's
    native settings at ``weights_out`` (default ``OUT/weights``). Returns it and the loss series."""
    import os

    from anim_jax.recipes import demo as recipe
    from anim_jax.train.metrics import scalar_series
    from data_pipelines.synthetic import palette_records

    from absl import flags

    # Grain's worker processes (the full recipe's data.num_workers) read absl flags, which fail as
    # "not parsed" in a program that never ran absl's app.run.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    runs = out / "runs"
    stage1, stage2 = stage_configs(settings, runs / "stage1" / "export")
    n_videos, n_frames = recipe.DATA[settings.variant]
    height, width = recipe.resolution(settings.variant)
    workers = data_workers or min(16, os.cpu_count() or 1)
    t0 = time.perf_counter()
    say(f"1/5 rendering {n_videos} training videos of {n_frames} frames at {width}x{height} in memory "
        f"({workers} processes; training colour pairs only)")
    records = palette_records(n_videos, seed=settings.seed, num_frames=n_frames, height=height, width=width,
                              palette=recipe.PALETTE, workers=workers)
    seconds["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"2/5 stage 1: denoiser + ReferenceNet + PoseGuider + image encoder on single frames, "
        f"{stage1.train.num_steps} steps, batch {stage1.data.batch_size} (the first step compiles)")
    _train(stage1, runs / "stage1", records)
    seconds["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say(f"3/5 stage 2: motion modules on {stage2.data.n_frames}-frame clips, {stage2.train.num_steps} steps, batch "
        f"{stage2.data.batch_size}, from the stage-1 export")
    _train(stage2, runs / "stage2", records)
    seconds["stage2"] = time.perf_counter() - t0
    weights = pathlib.Path(weights_out).absolute() if weights_out else out / "weights"
    half_precision_copy(runs / "stage2" / "export", weights, settings)
    losses = {"stage 1": scalar_series(runs / "stage1" / "logs", "loss"),
              "stage 2": scalar_series(runs / "stage2" / "logs", "loss")}
    plot_losses(out / "loss.png", losses)
    atomic.write_text(out / "train_log.json", json.dumps(dict(
        settings=dataclasses.asdict(settings), seconds=seconds, weights=str(weights),
        losses={k: [[s, v] for s, v in pts] for k, pts in losses.items()}), indent=1))
    say(f"   weights: {weights} (loss plot {out / 'loss.png'})")
    return weights, losses


def _train(cfg, workdir: pathlib.Path, records) -> None:
    from anim_jax.train.loop import STATUS_COMPLETED
    from anim_jax.train.run import train

    result = train(cfg, workdir, source=records)
    if result.status != STATUS_COMPLETED:
        raise RuntimeError(f"training in {workdir} stopped early: {result.status} at step {result.step}")


def half_precision_copy(export: pathlib.Path, dest: pathlib.Path, settings: DemoSettings) -> None:
    """``export`` (float32) as a float16 converted-weights directory at ``dest`` (loading casts back
    to the model's float32), recording the demo's native settings (resolution, sampling steps,
    guidance, context frames) so ``anim-jax animate``/``serve`` use them as defaults."""
    from anim_jax import native as native_lib
    from anim_jax import weights_dir
    from anim_jax.convert.readers import read_safetensors
    from anim_jax.convert.store import save_params
    from anim_jax.models.animate_anyone import COMPONENTS

    config = weights_dir.read_config(export)
    trained = native_lib.from_config(config)
    config[native_lib.KEY] = dataclasses.asdict(dataclasses.replace(
        trained, steps=settings.steps, guidance_scale=settings.guidance_scale))
    config["source"] = "anim-jax demo --train" + ("" if settings.variant == "full" else f" ({settings.variant})")
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COMPONENTS:
        src = weights_dir.weights_file(export, name)
        if src.is_file():
            arrays = read_safetensors(src)
            half = {k: v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}
            save_params(half, weights_dir.weights_file(tmp, name))
    weights_dir.write_config(tmp, {k: v for k, v in config.items() if k != "format_version"})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


# --------------------------------------------------------------------------------------------
# Held-out data
# --------------------------------------------------------------------------------------------


def _characters(seed: int, count: int) -> list[dict]:
    from data_pipelines.synthetic import _rng, make_character

    return [make_character(_rng(seed, i), ("plain",), "heldout") for i in range(count)]


def _example(char: dict, motion: dict, settings: DemoSettings, height: int, width: int) -> dict:
    """``char`` as its reference picture (its own first pose) and performing ``motion``."""
    from data_pipelines.synthetic import performance

    ref = performance(char, char, 1, height, width)
    n, s = settings.heldout_frames, settings.frame_stride
    perf = performance(char, motion, n * s, height, width)
    return dict(reference=ref["frames"][0], reference_parts=ref["parts"][0], poses=perf["poses"][::s],
                frames=perf["frames"][::s], parts=perf["parts"][::s], palette=char["palette"])


def heldout_set(settings: DemoSettings, height: int, width: int) -> list[dict]:
    """Held-out examples: character ``i`` (held-out colour pair) performing held-out motion ``i``.
    Each: ``reference`` (H, W, 3), ``reference_parts`` (H, W), ``poses``/``frames`` (F, H, W, 3),
    ``parts`` (F, H, W) uint8, ``palette`` (top, bottom colour names)."""
    chars = _characters(settings.seed + HELDOUT_CHARACTER_SEED, settings.heldout_videos)
    motions = _characters(settings.seed + HELDOUT_MOTION_SEED, settings.heldout_videos)
    return [_example(c, m, settings, height, width) for c, m in zip(chars, motions)]


def heldout_videos(settings: DemoSettings, height: int, width: int) -> list[dict]:
    """``heldout_set`` (the web page's demo characters and motions)."""
    return heldout_set(settings, height, width)


def swap_set(settings: DemoSettings, height: int, width: int, count: int = 4) -> list[dict]:
    """The appearance swap: held-out motion 0 performed by held-out characters 0..count-1."""
    chars = _characters(settings.seed + HELDOUT_CHARACTER_SEED, count)
    motion = _characters(settings.seed + HELDOUT_MOTION_SEED, 1)[0]
    return [_example(c, motion, settings, height, width) for c in chars]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def untrained_weights(weights) -> dict:
    """The architecture of ``weights`` with a random initialisation (as training starts: zero
    PoseGuider ``conv_out`` and motion ``proj_out``): the parameter state of each component."""
    from flax import nnx

    from anim_jax import weights_dir
    from anim_jax.models.animate_anyone import COMPONENTS
    from anim_jax.models.factory import build

    config = weights_dir.read_config(weights)
    return {name: nnx.state(build(name, config[name], seed=i)) for i, name in enumerate(COMPONENTS) if name in config}


def part_means(frame: np.ndarray, parts: np.ndarray) -> dict[str, np.ndarray]:
    """Mean RGB (0..255) of each ``COLOUR_PARTS`` part with at least ``MIN_PART_PIXELS`` pixels."""
    from data_pipelines.synthetic import PART_INDEX

    out = {}
    for name in COLOUR_PARTS:
        mask = parts == PART_INDEX[name]
        if mask.sum() >= MIN_PART_PIXELS:
            out[name] = frame[mask].astype(np.float64).mean(axis=0)
    return out


def part_colour_error(generated: np.ndarray, target_means: list[dict], parts: np.ndarray) -> dict:
    """Per-part colour error of a video: for each frame and part, the RGB distance (0..255 scale)
    between the generated frame's mean colour inside the part (the ground truth's part map) and
    ``target_means[frame][part]``; averaged over frames per part, ``mean`` over parts."""
    per_part: dict[str, list[float]] = {}
    for frame, means, p in zip(generated, target_means, parts):
        got = part_means(frame, p)
        for name, value in got.items():
            if name in means:
                per_part.setdefault(name, []).append(float(np.linalg.norm(value - means[name])))
    out = {name: float(np.mean(v)) for name, v in per_part.items()}
    out["mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


def _ignore_step(step: int) -> None:
    pass


def evaluate(weights, heldout: list[dict], swap: list[dict], settings: DemoSettings,
             say: Callable[[str], None] = print) -> dict:
    """Animates the held-out examples with the model in ``weights``, its untrained architecture and
    copy-the-reference, and the swap examples with the model; metrics and generated frames."""
    from flax import nnx

    from anim_jax.evaluate import mean_metrics, video_metrics
    from anim_jax.pipeline import AnimatePipeline

    pipe = AnimatePipeline.from_pretrained(weights)
    h, w = heldout[0]["reference"].shape[:2]

    calls = []

    def animate(example, seed):
        n = len(example["poses"])
        calls.append(seed)
        # The first call shows the compile notice and a progress bar; the rest are one line each.
        # They pass a no-op step hook instead, which keeps the per-step callback in the sampler, so
        # every call runs the program the first one compiled (without it XLA compiles it again).
        first = len(calls) == 1
        return pipe(example["reference"], list(example["poses"]), width=w, height=h, num_frames=n, steps=settings.steps,
                    guidance_scale=settings.guidance_scale, seed=seed, context_frames=n, context_overlap=0,
                    progress=first, on_step=None if first else _ignore_step).frames

    generated: dict[str, list[np.ndarray]] = {"trained": [], "untrained": [], "copy_reference": []}
    t0 = time.perf_counter()
    for i, ex in enumerate(heldout):
        generated["trained"].append(animate(ex, settings.seed + i))
        say(f"   trained model: held-out example {i + 1}/{len(heldout)} ({time.perf_counter() - t0:.0f} s)")
    swapped = [animate(ex, settings.seed + 100 + j) for j, ex in enumerate(swap)]
    say(f"   trained model: appearance swap, one motion x {len(swap)} references ({time.perf_counter() - t0:.0f} s)")
    for component, state in untrained_weights(weights).items():
        nnx.update(getattr(pipe, component), state)
    for i, ex in enumerate(heldout):
        generated["untrained"].append(animate(ex, settings.seed + i))
    say(f"   untrained model: {len(heldout)} held-out examples ({time.perf_counter() - t0:.0f} s)")
    for ex in heldout:
        generated["copy_reference"].append(np.repeat(ex["reference"][None], len(ex["poses"]), axis=0))

    metrics = {}
    for name, gens in generated.items():
        per_video = []
        for g, ex in zip(gens, heldout):
            m = video_metrics(g, ex["frames"]).as_dict()
            truth = [part_means(f, p) for f, p in zip(ex["frames"], ex["parts"])]
            m["colour"] = part_colour_error(g, truth, ex["parts"])
            per_video.append(m)
        mean = mean_metrics([_vm(m) for m in per_video])
        mean["colour"] = float(np.mean([m["colour"]["mean"] for m in per_video]))
        metrics[name] = dict(mean=mean, per_video=per_video)
    # swap[j] against reference k: the colours of output j (inside its ground truth's part map)
    # against the part colours of reference picture k
    ref_means = [part_means(ex["reference"], ex["reference_parts"]) for ex in swap]
    matrix = [[part_colour_error(out, [ref_means[k]] * len(out), ex["parts"])["mean"] for k in range(len(swap))]
              for out, ex in zip(swapped, swap)]
    swap_psnr = [video_metrics(out, ex["frames"]).psnr for out, ex in zip(swapped, swap)]
    return {"metrics": metrics, "generated": generated, "swapped": swapped, "swap_matrix": matrix,
            "swap_psnr": swap_psnr}


def _vm(m: dict):
    from anim_jax.evaluate import VideoMetrics

    return VideoMetrics(psnr=m["psnr"], ssim=m["ssim"], l1=m["l1"], frames=m["frames"])


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

METHODS = (("trained", "trained model"), ("untrained", "untrained model (same architecture, random init)"),
           ("copy_reference", "copy the reference frame"))
GRID_LABELS = ("reference", "pose", "generated", "ground truth")


def grid_video(reference: np.ndarray, poses: np.ndarray, generated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """reference | pose | generated | ground truth, each panel labelled and upscaled to ``GRID_HEIGHT``."""
    from anim_jax import media
    from anim_jax.driving import labelled

    panels = [labelled(p, label, GRID_HEIGHT) for p, label in zip((reference, poses, generated, truth), GRID_LABELS)]
    panels[0] = panels[0][0]
    return media.side_by_side(panels, pad=4)


def swap_video(swap: list[dict], swapped: list[np.ndarray]) -> np.ndarray:
    """Top row: the pose and the four references; bottom row: the driving character's ground truth
    and each reference's generated video. Labelled, upscaled."""
    from anim_jax import media
    from anim_jax.driving import labelled

    n = len(swapped[0])
    top = [labelled(swap[0]["poses"], "pose (one motion)", GRID_HEIGHT)]
    bottom = [labelled(np.zeros_like(swap[0]["poses"]), "", GRID_HEIGHT)]
    for j, (ex, out) in enumerate(zip(swap, swapped)):
        top.append(np.repeat(labelled(ex["reference"], f"reference {j}: {'/'.join(ex['palette'])}", GRID_HEIGHT), n, 0))
        bottom.append(labelled(out, f"generated {j}", GRID_HEIGHT))
    rows = [media.side_by_side(top, pad=4), media.side_by_side(bottom, pad=4)]
    gap = np.full((n, 4, rows[0].shape[2], 3), 255, np.uint8)
    return np.concatenate([rows[0], gap, rows[1]], axis=1)


def write_outputs(out: pathlib.Path, results: dict, heldout: list[dict], swap: list[dict], settings: DemoSettings, *,
                  weights: pathlib.Path, losses: dict | None, seconds: dict) -> dict:
    from anim_jax import media

    paths: dict = {"mp4": [], "gif": []}
    for i, (ex, gen) in enumerate(zip(heldout, results["generated"]["trained"])):
        grid = grid_video(ex["reference"], ex["poses"], gen, ex["frames"])
        mp4, gif = out / "videos" / f"heldout_{i}.mp4", out / "videos" / f"heldout_{i}.gif"
        media.write_mp4(mp4, grid, fps=settings.fps)
        media.write_gif(gif, grid, fps=settings.fps)
        paths["mp4"].append(str(mp4))
        paths["gif"].append(str(gif))
    swap_grid = swap_video(swap, results["swapped"])
    paths["swap_mp4"] = str(out / "videos" / "appearance_swap.mp4")
    paths["swap_gif"] = str(out / "videos" / "appearance_swap.gif")
    media.write_mp4(paths["swap_mp4"], swap_grid, fps=settings.fps)
    media.write_gif(paths["swap_gif"], swap_grid, fps=settings.fps)

    # The inputs of the printed `anim-jax animate` command: held-out example 0.
    from PIL import Image

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    ref_png, pose_mp4 = inputs / "reference_0.png", inputs / "poses_0.mp4"
    atomic.write_with(ref_png, lambda tmp: Image.fromarray(heldout[0]["reference"]).save(tmp, format="PNG"))
    from data_pipelines.video_io import write_video

    write_video(pose_mp4, heldout[0]["poses"], fps=settings.fps, lossless=True)
    paths["animate_command"] = animate_command(weights, ref_png, pose_mp4, out / "animated_0.mp4")

    metrics = results["metrics"]
    psnr = {k: metrics[k]["mean"]["psnr"] for k, _ in METHODS}
    colour = {k: metrics[k]["mean"]["colour"] for k, _ in METHODS}
    matrix = results["swap_matrix"]
    targets = dict(
        psnr_lead_over_copy_db=psnr["trained"] - psnr["copy_reference"],
        psnr_lead_at_least_3db=bool(psnr["trained"] - psnr["copy_reference"] >= 3.0),
        colour_error_below_untrained=bool(colour["trained"] < colour["untrained"]),
        # "lower than the untrained model's by a wide margin" (issue 15), read as: at most half of it
        colour_error_at_most_half_untrained=bool(colour["trained"] <= 0.5 * colour["untrained"]),
        swap_own_reference_closest=[bool(all(row[j] < row[k] for k in range(len(row)) if k != j))
                                    for j, row in enumerate(matrix)],
    )
    record = dict(settings=dataclasses.asdict(settings), weights=str(weights), methods=dict(METHODS), metrics=metrics,
                  swap=dict(colour_error_matrix=matrix, psnr=results["swap_psnr"],
                            palettes=[list(ex["palette"]) for ex in swap]),
                  targets=targets, seconds=seconds,
                  losses=None if losses is None else {k: [[s, v] for s, v in pts] for k, pts in losses.items()})
    atomic.write_text(out / "metrics.json", json.dumps(record, indent=2))
    atomic.write_text(out / "metrics.md", metrics_table(record, heldout))
    paths["metrics_md"] = str(out / "metrics.md")
    paths["metrics_json"] = str(out / "metrics.json")
    if losses is not None:
        paths["loss_plot"] = str(out / "loss.png")
    return paths


def animate_command(weights, reference, poses, output) -> str:
    """The ``anim-jax animate`` command that redoes held-out example 0 with these weights (their
    native settings supply size, steps and guidance)."""
    import shlex

    return " ".join(["anim-jax", "animate", "--weights", shlex.quote(str(weights)), "--reference",
                     shlex.quote(str(reference)), "--pose", shlex.quote(str(poses)), "--out", shlex.quote(str(output))])


def metrics_table(record: dict, heldout: list[dict]) -> str:
    metrics, settings = record["metrics"], record["settings"]
    n = metrics["trained"]["mean"]["videos"]
    h, w = heldout[0]["reference"].shape[:2]
    lines = [
        f"# anim-jax demo: {n} held-out characters x {settings['heldout_frames']} frames, {w}x{h}",
        "",
        "Characters wearing colour pairs no training video shows, each performing the motion of another held-out "
        "character (a seed no training video used); the reference is the character in its own first pose. Per-frame "
        "metrics against the ground truth, averaged per video then over videos (PSNR/SSIM on [0, 1], L1 on [0, 1]); "
        "colour error: per body part (skin, hair, top, bottom, shoes; the generator's part maps), the RGB distance "
        "(0-255) between the mean colour of the generated and the true pixels, averaged over parts and frames.",
        f"Sampling: {settings['steps']} DDIM steps, guidance scale {settings['guidance_scale']}. "
        f"Weights: `{record['weights']}`.",
        "",
        "| method | PSNR (dB) ↑ | SSIM ↑ | L1 ↓ | colour error ↓ |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in METHODS:
        m = metrics[key]["mean"]
        lines.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['l1']:.4f} | {m['colour']:.1f} |")
    swap = record["swap"]
    k = len(swap["colour_error_matrix"])
    lines += [
        "",
        f"## Appearance swap: one held-out motion, {k} held-out references",
        "",
        "Colour error of each generated video (row) against each reference's part colours (column); the own "
        "reference (diagonal) should be the lowest in its row.",
        "",
        "| output \\ reference | " + " | ".join(f"{j}: {'/'.join(p)}" for j, p in enumerate(swap["palettes"])) + " | PSNR vs truth |",
        "|---|" + "---:|" * (k + 1),
    ]
    for j, row in enumerate(swap["colour_error_matrix"]):
        cells = [f"**{v:.1f}**" if i == j else f"{v:.1f}" for i, v in enumerate(row)]
        lines.append(f"| generated {j} | " + " | ".join(cells) + f" | {swap['psnr'][j]:.2f} |")
    t = record["targets"]
    lines += [
        "",
        "## Targets (issue 15)",
        "",
        f"- PSNR lead over copy-the-reference: {t['psnr_lead_over_copy_db']:+.2f} dB (target >= 3 dB): "
        f"{'reached' if t['psnr_lead_at_least_3db'] else 'NOT reached'}",
        f"- colour error at most half the untrained model's: "
        f"{'reached' if t['colour_error_at_most_half_untrained'] else 'NOT reached'} "
        f"({metrics['trained']['mean']['colour']:.1f} vs {metrics['untrained']['mean']['colour']:.1f}, "
        f"bar {0.5 * metrics['untrained']['mean']['colour']:.1f})",
        f"- swap: each output closest in colour to its own reference: "
        f"{sum(t['swap_own_reference_closest'])}/{len(t['swap_own_reference_closest'])}",
    ]
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    s = result["seconds"]
    if result["metrics"] is None:
        return f"\nanim-jax demo: trained in {s['total']:.0f} s; weights: {result['weights']}"
    m = result["metrics"]
    p = result["paths"]
    psnr = {k: m[k]["mean"]["psnr"] for k, _ in METHODS}
    colour = {k: m[k]["mean"]["colour"] for k, _ in METHODS}
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in s.items() if k != "total")
    lines = [
        "",
        f"anim-jax demo finished in {s['total']:.0f} s ({timing})",
        f"held-out PSNR: trained {psnr['trained']:.2f} dB, untrained {psnr['untrained']:.2f} dB, copy-the-reference "
        f"{psnr['copy_reference']:.2f} dB (lead over copying {psnr['trained'] - psnr['copy_reference']:+.2f} dB)",
        f"per-part colour error: trained {colour['trained']:.1f}, untrained {colour['untrained']:.1f}, "
        f"copy-the-reference {colour['copy_reference']:.1f}",
        f"  metrics:   {p['metrics_md']}  ({p['metrics_json']})",
        f"  videos:    {pathlib.Path(p['mp4'][0]).parent}/heldout_*.mp4 / .gif  (reference | pose | generated | ground truth)",
        f"  swap:      {p['swap_mp4']}  (one motion, four references)",
    ]
    if "loss_plot" in p:
        lines.append(f"  loss plot: {p['loss_plot']}")
    lines += [
        f"  weights:   {result['weights']}",
        f"  reuse them: {p['animate_command']}",
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
        d.text((x0, 8), f"{name}: training loss (x0-MSE, x0-prediction)", fill=(0, 0, 0))
        d.line([to_xy(s, v) for s, v in zip(steps, vals)], fill=(160, 190, 235), width=1)
        window = max(1, len(vals) // 15)
        smooth = np.convolve(vals, np.ones(window) / window, mode="valid")
        d.line([to_xy(s, v) for s, v in zip(steps[window - 1:], smooth)], fill=(20, 60, 170), width=3)
    atomic.write_with(path, lambda tmp: img.save(tmp, format="PNG"))


if __name__ == "__main__":
    from anim_jax.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
