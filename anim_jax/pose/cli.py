"""``anim-jax pose``: a video (or a folder of videos) -> Moore's skeleton videos (+ keypoints).

    anim-jax pose dance.mp4 --weights weights/dwpose --out dance_kps.mp4 --keypoints dance.npz
    anim-jax pose data/videos --weights weights/dwpose          # -> data/videos_dwpose/<same paths>.mp4

A folder gives Moore-AnimateAnyone's training layout (``ROOT_dwpose/x.mp4``, what ``anim-jax
prepare`` reads), all videos in one pass over the device mesh; videos whose output exists are
skipped (rerun to resume), unreadable ones are reported and the rest go on. Every path may be a
URL (``gs://bucket/videos``): each video is downloaded while its frames are read, each output
uploaded as one object.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from anim_jax import storage

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def add_pose_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pose",
        help="video(s) -> DWPose skeleton video(s) as Moore renders them (+ keypoints)",
        description=(
            "Extract whole-body poses with DWPose (converted with `anim-jax convert-pose`) on all local "
            "devices and render them as Moore-AnimateAnyone does. INPUT is a video, or a folder of videos "
            "whose pose videos go to INPUT_dwpose/ at the same relative paths (Moore's training layout)."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="a video file or a folder of videos")
    p.add_argument("--weights", required=True, metavar="DIR", help="converted DWPose directory (anim-jax convert-pose)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="pose video (default: INPUT_kps.mp4 beside the input); for a folder: the output root "
                        "(default: INPUT_dwpose)")  # fmt: skip
    p.add_argument("--keypoints", default=None, metavar="PATH",
                   help="also save the keypoints (.npz; for a folder: a directory of .npz at the same relative paths)")
    p.add_argument("--source-size", action="store_true",
                   help="render at the source video's size (default: Moore's detection size, shorter side 512)")
    p.add_argument("--detect-resolution", type=int, default=512, metavar="N",
                   help="detect at shorter side N rounded to multiples of 64, as Moore (0: the source size)")
    p.add_argument("--detector-size", type=int, default=640, metavar="N",
                   help="the detector's letterboxed input, N x N (DWPose: 640; smaller is faster, less accurate)")
    p.add_argument("--all-persons", action="store_true", help="keep every person (default: Moore's best one)")
    p.add_argument("--no-person", choices=("empty", "full_image"), default="empty",
                   help="frames where nobody is detected: an empty pose (default) or Moore's whole-frame estimate")
    p.add_argument("--batch-size", type=int, default=8, help="frames per device batch (rounded up to the device count)")
    p.add_argument("--direct-conv", action="store_true",
                   help="on CPU, XLA's direct 3x3 convolutions in the detector instead of Winograd's "
                        "(slower, a few float32 roundings closer to the original)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pose)
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"anim-jax pose: error: {msg}", file=sys.stderr)
    return code


def _videos_under(root) -> list[str]:
    """The videos under ``root`` (a folder or a URL prefix), as paths relative to it."""
    if storage.is_url(root):  # one listing (epath refuses recursive globs on object stores)
        import fsspec

        fs, prefix = fsspec.core.url_to_fs(str(root))
        names = [p[len(prefix.rstrip("/")) + 1:] for p in fs.find(prefix)]
    else:
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(n for n in names if pathlib.PurePosixPath(n).suffix.lower() in VIDEO_SUFFIXES)


def _summary(name: str, poses) -> str:
    missing = poses.frames_without_person
    text = f"{name}: {len(poses)} frames"
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        text += f", {len(missing)} without a person (frames {shown})"
    return text


def _write(poses, video_out, keypoints_out, source_size: bool) -> None:
    from data_pipelines.video_io import write_video

    for path in (video_out, keypoints_out):
        if path is not None and not storage.is_url(path):  # (an object store has no folders to make)
            path.parent.mkdir(parents=True, exist_ok=True)
    write_video(video_out, poses.render("source" if source_size else "detect"), fps=poses.fps or 30.0)
    if keypoints_out is not None:
        poses.save(keypoints_out)


def _check_buckets(args: argparse.Namespace) -> None:
    """Every URL argument's bucket exists; raises ``FileNotFoundError`` naming the flag."""
    for flag, value in (("INPUT", args.input), ("--weights", args.weights), ("--out", args.out),
                        ("--keypoints", args.keypoints)):
        if value is not None and storage.is_url(value):
            storage.check_bucket(value, flag)


def run_pose(args: argparse.Namespace) -> int:
    try:
        _check_buckets(args)
    except FileNotFoundError as e:
        return _fail(str(e))
    src = storage.as_path(args.input)  # every path may be a URL (gs://): videos are downloaded one at a time
    if not src.exists():
        return _fail(f"INPUT {str(src)!r} does not exist")
    weights = storage.as_path(args.weights)
    if not weights.is_dir():
        return _fail(f"--weights {str(weights)!r} is not a directory (convert DWPose once with anim-jax convert-pose)")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.detector_size < 32 or args.detector_size % 32:
        return _fail(f"--detector-size must be a positive multiple of 32, got {args.detector_size}")
    if args.detect_resolution < 0 or 0 < args.detect_resolution < 64:
        return _fail(f"--detect-resolution must be 0 or >= 64, got {args.detect_resolution}")

    is_dir = src.is_dir()
    if is_dir:
        root = src if storage.is_url(src) else src.resolve()
        out_root = storage.as_path(args.out) if args.out else root.parent / (root.name + "_dwpose")
        kp_root = storage.as_path(args.keypoints) if args.keypoints else None
        videos = _videos_under(root)
        if not videos:
            return _fail(f"INPUT folder {str(src)!r} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
        jobs = []
        for rel in videos:
            stem = rel.rsplit(".", 1)[0]
            out = out_root / (stem + ".mp4")
            kp = kp_root / (stem + ".npz") if kp_root else None
            if not args.overwrite and out.exists() and (kp is None or kp.exists()):
                continue
            jobs.append((root / rel, out, kp))
        if not jobs:
            print(f"anim-jax pose: all {len(videos)} videos already have pose videos under {out_root} (--overwrite to redo)")
            return 0
    else:
        out = storage.as_path(args.out) if args.out else src.with_name(src.stem + "_kps.mp4")
        kp = storage.as_path(args.keypoints) if args.keypoints else None
        if out.suffix.lower() not in VIDEO_SUFFIXES:
            return _fail(f"--out {str(out)!r} must be a video file ({', '.join(VIDEO_SUFFIXES)})")
        if kp is not None and kp.suffix != ".npz":
            return _fail(f"--keypoints {str(kp)!r} must end in .npz")
        for path, flag in ((out, "--out"), (kp, "--keypoints")):
            if path is not None and path.exists() and not args.overwrite:
                return _fail(f"{flag} {str(path)!r} exists (pass --overwrite to replace it)")
        jobs = [(src, out, kp)]

    from anim_jax.pose.extract import PoseExtractor, PoseInputError

    try:
        extractor = PoseExtractor.from_pretrained(
            weights,
            batch_size=args.batch_size,
            detect_resolution=args.detect_resolution or None,
            all_persons=args.all_persons,
            no_person=args.no_person,
            detector_input=(args.detector_size, args.detector_size),
            winograd=False if args.direct_conv else None,
        )
    except (OSError, ValueError) as e:
        return _fail(f"--weights {str(weights)!r}: {e}")
    by_input = {str(v): (out, kp) for v, out, kp in jobs}
    failed = []
    try:
        results = extractor.extract_videos(list(by_input), progress=not args.no_progress, skip_errors=is_dir)
        for path, poses in results:
            if isinstance(poses, Exception):
                failed.append(str(poses))
                continue
            out, kp = by_input[path]
            _write(poses, out, kp, args.source_size)
            print(_summary(str(out), poses))
    except PoseInputError as e:
        return _fail(str(e))
    if failed:
        print(f"anim-jax pose: {len(failed)} of {len(jobs)} videos could not be read:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
