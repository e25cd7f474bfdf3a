"""``anim-jax animate``: one reference image + a pose video (or folder) -> an mp4 (and optionally GIF / grid)."""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

from anim_jax import driving_cli, storage


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _finite_float(*, low: float, strict: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}, got {text!r}")
        return value

    return parse


def add_animate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "animate",
        help="animate a reference image with a pose sequence",
        description="Animate a reference character image with a pose video (or a folder of pose images), "
        "using weights converted with `anim-jax convert`.",
    )
    p.add_argument("--weights", required=True, help="converted-weights directory (anim-jax convert)")
    p.add_argument("--reference", required=True,
                   help="reference image (png/jpg/...), or a video (its frame --reference-frame)")
    p.add_argument("--pose", default=None, help="pose video or folder of pose images (or --driving-video)")
    p.add_argument("--out", required=True, help="output video path (.mp4)")
    # None: the weights directory's native settings (anim_jax.native; Moore's 512x768, 25, 3.5, 24).
    p.add_argument("--width", "-W", type=_int_at_least(1), default=None,
                   help="default: the weights' native width (Moore: 512)")
    p.add_argument("--height", "-H", type=_int_at_least(1), default=None,
                   help="default: the weights' native height (Moore: 768)")
    p.add_argument("--frames", "-L", type=_int_at_least(1), default=None,
                   help="number of frames (default: all pose frames)")
    p.add_argument("--steps", type=_int_at_least(1), default=None, help="DDIM steps (default: the weights' native, Moore: 25)")
    p.add_argument("--guidance", type=_finite_float(low=0.0), default=None,
                   help="classifier-free guidance scale, a finite number >= 0: result = uncond + guidance * "
                        "(cond - uncond); 1 uses the reference-conditioned prediction alone, 0 the unconditional "
                        "one, > 1 follows the reference more strongly (default: the weights' native, Moore: 3.5). "
                        "Negative values, which push the video away from the reference, are refused")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--context-frames", type=_int_at_least(1), default=None,
                   help="frames per context window (default: the weights' native, Moore: 24)")
    p.add_argument("--context-overlap", type=_int_at_least(0), default=None,
                   help="frames shared by consecutive windows, less than --context-frames "
                        "(default 4, fewer for windows under 5 frames)")
    p.add_argument("--open-loop", action="store_true",
                   help="do not wrap the last window onto the first frames (Moore's default wraps)")
    p.add_argument("--fps", type=_finite_float(low=0.0, strict=True), default=None,
                   help="output frame rate (default: the pose video's, else 8)")
    p.add_argument("--grid", action="store_true", help="also write OUT_grid.mp4: reference | pose | result "
                   "(with --driving-video: reference | driving video | aligned pose | result, labelled)")
    p.add_argument("--gif", action="store_true", help="also write a GIF next to the mp4")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype (parameters stay as stored)")
    p.add_argument("--attention", choices=("xla", "chunked", "flash", "cudnn", "auto"), default="auto",
                   help="attention implementation (auto: cuDNN on GPU in half precision; on CPU flash, "
                        "tiled with an online softmax, when the score matrix is large)")
    p.add_argument("--devices", type=_int_at_least(1), default=None,
                   help="shard context windows over the first N devices, N >= 1 (default: all devices)")
    p.add_argument("--window-batch", type=_int_at_least(0), default=1, metavar="N",
                   help="context windows per denoiser call (default 1; 0: all windows of a step in one "
                        "call, which holds all their activations at once)")
    p.add_argument("--cpu-devices", type=_int_at_least(1), default=None, metavar="N",
                   help="on a CPU: run as N devices of one thread each, the frames split over them, N at "
                        "most your cores (README, Performance). "
                        "Default: one device using XLA's threads")
    p.add_argument("--no-progress", action="store_true")
    driving_cli.add_arguments(p)
    p.set_defaults(func=run_animate)
    return p


def output_paths(args: argparse.Namespace) -> list[pathlib.Path]:
    out = storage.as_path(args.out)
    paths = [out]
    if args.gif:
        paths.append(out.with_suffix(".gif"))
    if args.grid:
        paths.append(out.with_name(out.stem + "_grid.mp4"))
    return paths + driving_cli.output_paths(args)


def check_output_path(path: pathlib.Path, flag: str = "--out") -> None:
    """Raises ``ValueError`` unless ``path`` can be written as a new or replaced file: it is not a
    directory, and its nearest existing ancestor is a directory this process may write into (the
    missing ones are created at write time). On an object store: not a "directory" (prefix) either,
    and its bucket exists."""
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; expected a file path")
    if storage.is_url(path):
        storage.check_bucket(path, flag)
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: no permission to write into {str(parent)!r}")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the arguments that is known before loading a model (inputs exist, outputs
    writable, settings consistent); raises ``ValueError``/``FileNotFoundError`` naming the flag."""
    out = storage.as_path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {str(out)!r}")
    for path in output_paths(args):
        check_output_path(path)
    if not storage.as_path(args.weights).is_dir():
        raise FileNotFoundError(f"--weights {args.weights!r} is not a directory (expected `anim-jax convert` output)")
    for flag, value in (("--reference", args.reference), ("--pose", args.pose)):
        if value is not None and not storage.as_path(value).exists():
            raise FileNotFoundError(f"{flag} {value!r} does not exist")
    if args.context_overlap is not None:
        frames = args.context_frames
        if frames is None:  # the weights' native window (a cheap read of anim_jax.json), else Moore's
            from anim_jax import native, weights_dir

            try:
                frames = native.from_config(weights_dir.read_config(args.weights)).context_frames
            except (OSError, ValueError):
                frames = native.MOORE.context_frames
        if args.context_overlap >= frames:
            raise ValueError(f"--context-overlap {args.context_overlap} must be less than --context-frames {frames}")
    driving_cli.check_args(args)


def run_animate(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"anim-jax animate: error: {e}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp

    from anim_jax import media, parallel
    from anim_jax.models.attention_ops import AttentionConfig
    from anim_jax.pipeline import AnimatePipeline

    out = storage.as_path(args.out)
    if args.cpu_devices is not None:
        try:
            parallel.use_cpu_devices(args.cpu_devices)
        except RuntimeError as e:
            print(f"anim-jax animate: error: --cpu-devices: {e}", file=sys.stderr)
            return 2
        if jax.default_backend() != "cpu":
            print(f"anim-jax animate: error: --cpu-devices is for a CPU run; JAX runs on {jax.default_backend()} "
                  f"here (JAX_PLATFORMS=cpu forces the CPU)", file=sys.stderr)
            return 2
    if args.devices is not None and args.devices > len(jax.devices()):
        print(f"anim-jax animate: error: --devices {args.devices}: only {len(jax.devices())} devices are present", file=sys.stderr)
        return 2
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    mesh = parallel.make_mesh((len(devices),), ("data",), devices=devices) if len(devices) > 1 else None
    try:
        pipe = AnimatePipeline.from_pretrained(
            args.weights, dtype=getattr(jnp, args.dtype), attention=AttentionConfig(args.attention), mesh=mesh
        )
        result = pipe(
            args.reference, args.pose, **driving_cli.pipeline_kwargs(args, devices), width=args.width, height=args.height, num_frames=args.frames,
            steps=args.steps, guidance_scale=args.guidance, seed=args.seed, context_frames=args.context_frames,
            context_overlap=args.context_overlap, closed_loop=not args.open_loop, progress=not args.no_progress,
            window_batch=args.window_batch or None,
        )
    except (FileNotFoundError, ValueError) as e:  # media.InputError is a ValueError
        print(f"anim-jax animate: error: {e}", file=sys.stderr)
        return 2
    fps = args.fps or result.fps or 8.0
    media.write_mp4(out, result.frames, fps=fps)
    written = [out]
    if args.gif:
        media.write_gif(out.with_suffix(".gif"), result.frames, fps=fps)
        written.append(out.with_suffix(".gif"))
    written += driving_cli.write_extras(args, result, fps)
    if args.grid and args.driving_video is None:
        grid = media.side_by_side([result.reference, result.poses, result.frames])
        grid_path = out.with_name(out.stem + "_grid.mp4")
        media.write_mp4(grid_path, grid, fps=fps)
        written.append(grid_path)
    print(f"wrote {', '.join(map(str, written))} ({result.frames.shape[0]} frames, "
          f"{result.frames.shape[2]}x{result.frames.shape[1]}, {fps:g} fps)")
    return 0
