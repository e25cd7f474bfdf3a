"""The ``--driving-video`` part of ``anim-jax animate``: its flags, their checks (before any work) and the
files it writes besides the result (``--save-poses``, the four-panel ``--grid``)."""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from anim_jax import storage


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("from a dance video (instead of --pose)")
    g.add_argument("--driving-video", default=None, metavar="VIDEO",
                   help="a video of a person: DWPose extracts its poses, aligns them to the reference and draws "
                        "them (needs --pose-weights)")
    g.add_argument("--pose-weights", default=None, metavar="DIR",
                   help="converted DWPose directory (anim-jax convert-pose)")
    g.add_argument("--no-align", action="store_true",
                   help="draw the dancer's poses as they are (Moore's behaviour) instead of on the reference's body")
    g.add_argument("--save-poses", action="store_true",
                   help="also write OUT_pose.mp4 (the drawn poses, reusable with --pose), OUT_keypoints.npz "
                        "(their keypoints) and OUT_driving_keypoints.npz (as extracted)")
    g.add_argument("--reference-frame", type=int, default=0, metavar="N",
                   help="with a video as --reference: use its frame N (default 0)")
    g.add_argument("--pose-batch-size", type=int, default=8, help="frames per pose-extraction batch")
    g.add_argument("--detect-resolution", type=int, default=512, metavar="N",
                   help="pose detection resizes frames so the shorter side is N (Moore's 512; 0: source size)")
    g.add_argument("--detector-size", type=int, default=640, metavar="N",
                   help="the person detector's square input (DWPose's 640; a multiple of 32)")


def output_paths(args: argparse.Namespace) -> list[pathlib.Path]:
    from anim_jax.driving import saved_pose_paths

    return saved_pose_paths(args.out) if args.driving_video is not None and args.save_poses else []


def check_args(args: argparse.Namespace) -> None:
    """Raises ValueError/FileNotFoundError naming the flag; runs before any model is loaded."""
    from anim_jax import media

    if (args.pose is None) == (args.driving_video is None):
        raise ValueError("give either --pose (rendered pose frames) or --driving-video (a video of a person)")
    if args.reference_frame < 0:
        raise ValueError(f"--reference-frame must be >= 0, got {args.reference_frame}")
    if args.detector_size < 32 or args.detector_size % 32:
        raise ValueError(f"--detector-size must be a positive multiple of 32, got {args.detector_size}")
    if args.detect_resolution and args.detect_resolution < 64:
        raise ValueError(f"--detect-resolution must be 0 or >= 64, got {args.detect_resolution}")
    if args.pose_batch_size < 1:
        raise ValueError(f"--pose-batch-size must be >= 1, got {args.pose_batch_size}")
    if args.driving_video is None:
        for flag in ("pose_weights", "save_poses", "no_align"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} only applies with --driving-video")
        return
    video = _existing_input(args.driving_video, "--driving-video")
    if args.pose_weights is None:
        raise ValueError("--driving-video needs --pose-weights (a DWPose directory from anim-jax convert-pose)")
    if storage.is_url(args.pose_weights):
        storage.check_bucket(args.pose_weights, "--pose-weights")
    if not storage.as_path(args.pose_weights).is_dir():
        raise FileNotFoundError(f"--pose-weights {args.pose_weights!r} is not a directory (convert DWPose with "
                                "anim-jax convert-pose)")
    try:  # readable as a video, with frames: checked now rather than after loading the models
        media.read_video_frames(video, 1)
    except media.InputError as e:
        raise ValueError(f"--driving-video: {str(e).replace('pose video ', '')}") from None


def _existing_input(path: str, flag: str):
    """``path`` as a path (local or URL); raises ``FileNotFoundError`` naming ``flag`` unless it is a file."""
    video = storage.as_path(path)
    if storage.is_url(video):
        storage.check_bucket(video, flag)
    if not video.is_file():
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    return video


def pipeline_kwargs(args: argparse.Namespace, devices) -> dict:
    """The extra ``AnimatePipeline.__call__`` arguments: the reference frame, and for --driving-video
    the pose extractor, sharded over the same ``devices`` as the sampler."""
    if args.driving_video is None:
        return {"reference_frame": args.reference_frame}
    from anim_jax import parallel
    from anim_jax.pose.extract import PoseExtractor

    extractor = PoseExtractor.from_pretrained(
        args.pose_weights, batch_size=args.pose_batch_size, mesh=parallel.make_mesh((len(devices),), ("data",), devices=devices),
        detect_resolution=args.detect_resolution or None, detector_input=(args.detector_size, args.detector_size),
    )
    return {"driving_video": args.driving_video, "pose_extractor": extractor, "align": not args.no_align,
            "reference_frame": args.reference_frame}


def write_extras(args: argparse.Namespace, result, fps: float) -> list[pathlib.Path]:
    """``--save-poses`` files and, with --driving-video, the four-panel grid; returns what it wrote."""
    from anim_jax import driving, media

    if args.driving_video is None:
        return []
    written = result.driving.save(args.out) if args.save_poses else []
    if args.grid:
        out = storage.as_path(args.out)
        n = len(result.frames)
        frames = np.stack([np.asarray(f) for f in driving.read_frames(args.driving_video, n)])
        grid = driving.grid(result.reference, frames, result.driving.pictures[:n], result.frames)
        path = out.with_name(out.stem + "_grid.mp4")
        media.write_mp4(path, grid, fps=fps)
        written.append(path)
    return written
