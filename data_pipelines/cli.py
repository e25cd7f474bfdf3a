"""Command-line hooks for ``anim-jax prepare`` and ``anim-jax make-synthetic``.

``anim_jax.cli`` wires them in::

    add_prepare_parser(subparsers)     # -> args.func = run_prepare
    add_synthetic_parser(subparsers)   # -> args.func = run_synthetic

``python -m data_pipelines.cli {prepare,make-synthetic} ...`` runs them on their own.
"""

from __future__ import annotations

import argparse
import sys


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help="videos + pose videos -> TFDS ArrayRecord training dataset",
        description=(
            "Build the training dataset from videos and their pose videos. Each SOURCE is a folder ROOT "
            "of videos with the pose videos under ROOT_dwpose at the same relative paths, or a meta JSON "
            "list of {\"video_path\", \"kps_path\"} (Moore-AnimateAnyone's layouts). Frames are stored as "
            "JPEG, poses as PNG. Bad videos are skipped and reported; the dataset appears at OUTPUT only "
            "when complete."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="video folder or meta .json file")
    p.add_argument("-o", "--output", required=True, help="dataset directory to create")
    p.add_argument("--resize", type=int, default=None, metavar="N", help="resize frames so the shorter side is N")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument(
        "--jpeg-subsampling", choices=("444", "422", "420"), default="444", help="JPEG chroma subsampling (default 444: none)"
    )
    p.add_argument(
        "--on-mismatch",
        choices=("skip", "truncate"),
        default="skip",
        help="video/pose frame-count mismatch: skip the video (default) or cut both to the shorter length",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs; 0: none)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (once the new one is complete)")
    p.add_argument("--report", default=None, help="also write the JSON report here")
    p.add_argument("--limit", type=int, default=None, help="use only the first N videos")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--extract-poses", action="store_true",
                   help="SOURCEs are folders of raw videos: extract poses with DWPose on the device mesh, render "
                        "them as Moore does and store the keypoints with the records (no ROOT_dwpose needed)")
    p.add_argument("--pose-weights", default=None, metavar="DIR", help="converted DWPose directory (anim-jax convert-pose)")
    p.add_argument("--pose-batch-size", type=int, default=8, metavar="N", help="frames per device batch for --extract-poses")
    p.add_argument("--detect-resolution", type=int, default=512, metavar="N",
                   help="--extract-poses: detect at shorter side N rounded to multiples of 64, as Moore (0: the source size)")
    p.add_argument("--detector-size", type=int, default=640, metavar="N",
                   help="--extract-poses: the detector's letterboxed input, N x N (DWPose: 640; smaller is faster)")
    p.set_defaults(func=run_prepare)
    return p


def run_prepare(args: argparse.Namespace) -> int:
    from data_pipelines.prepare import NoUsableVideos, prepare

    if args.extract_poses and not args.pose_weights:
        print("anim-jax prepare: error: --extract-poses needs --pose-weights DIR (convert DWPose with anim-jax convert-pose)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.pose_weights and not args.extract_poses:
        print("anim-jax prepare: error: --pose-weights is only used with --extract-poses", file=sys.stderr)
        return 2
    if args.detector_size <= 0 or args.detector_size % 32:
        print(f"anim-jax prepare: error: --detector-size must be a positive multiple of 32, got {args.detector_size}",
              file=sys.stderr)  # fmt: skip
        return 2
    if 0 < args.detect_resolution < 64 or args.detect_resolution < 0:
        print(f"anim-jax prepare: error: --detect-resolution must be 0 or >= 64, got {args.detect_resolution}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.extract_poses:
        from anim_jax.train import distributed

        # Before anything starts JAX: in a multi-process run (launch/local.sh, SLURM, a TPU pod) the
        # processes share the videos out, and the first one writes the dataset.
        distributed.maybe_initialize_distributed()

    try:
        prepare(
            args.sources,
            args.output,
            resize=args.resize,
            jpeg_quality=args.jpeg_quality,
            jpeg_subsampling=args.jpeg_subsampling,
            on_mismatch=args.on_mismatch,
            workers=args.workers,
            overwrite=args.overwrite,
            report_path=args.report,
            limit=args.limit,
            progress=not args.no_progress,
            extract_poses=args.extract_poses,
            pose_weights=args.pose_weights,
            pose_batch_size=args.pose_batch_size,
            pose_options=dict(detect_resolution=args.detect_resolution or None,
                              detector_input=(args.detector_size, args.detector_size)),
        )
    except (NoUsableVideos, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"anim-jax prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_synthetic_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-synthetic",
        help="generate synthetic character videos with OpenPose-style pose videos",
        description=(
            "Procedural characters moving through articulated poses. --videos ROOT writes ROOT/char_*.mp4 "
            "and ROOT_dwpose/char_*.mp4 (the `prepare` input layout); --dataset DIR writes the prepared "
            "dataset directly. Deterministic in --seed."
        ),
    )
    p.add_argument("-n", "--num-videos", type=int, default=8)
    p.add_argument("--videos", default=None, metavar="ROOT", help="write videos to ROOT and ROOT_dwpose")
    p.add_argument("--dataset", default=None, metavar="DIR", help="write a prepared dataset to DIR")
    p.add_argument("--frames", type=int, default=48, help="frames per video")
    p.add_argument("--size", type=int, default=64, help="height and width (overridden by --height/--width)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backgrounds", default=None, metavar="KINDS",
                   help="comma-separated background kinds to draw from: vgradient, hgradient, floor, checks, plain "
                        "(default: all but plain)")
    p.add_argument("--lossy", action="store_true", help="ordinary H.264 (yuv420p) instead of lossless video")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dataset")
    p.set_defaults(func=run_synthetic)
    return p


def run_synthetic(args: argparse.Namespace) -> int:
    from data_pipelines import synthetic

    if not args.videos and not args.dataset:
        print("anim-jax make-synthetic: give --videos ROOT and/or --dataset DIR", file=sys.stderr)
        return 2
    h = args.height or args.size
    w = args.width or args.size
    try:
        backgrounds = synthetic.check_backgrounds(args.backgrounds.split(",") if args.backgrounds else None)
    except ValueError as e:
        print(f"anim-jax make-synthetic: --backgrounds: {e}", file=sys.stderr)
        return 2
    common = dict(seed=args.seed, num_frames=args.frames, height=h, width=w, fps=args.fps, backgrounds=backgrounds)
    if args.videos:
        paths = synthetic.write_synthetic_videos(args.videos, args.num_videos, lossless=not args.lossy, **common)
        print(f"wrote {len(paths)} videos to {args.videos} and {args.videos.rstrip('/')}_dwpose")
    if args.dataset:
        try:
            synthetic.write_synthetic_dataset(args.dataset, args.num_videos, overwrite=args.overwrite, **common)
        except FileExistsError as e:
            print(f"anim-jax make-synthetic: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote a dataset of {args.num_videos} videos to {args.dataset}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(sub)
    add_synthetic_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
